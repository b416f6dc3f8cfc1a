"""Prometheus metrics at ``/metrics``, read from the engine at scrape time.

Contract: ``Metrics(engine)`` owns a private registry.  Gauges and counters are collected
from the engine's own counters when scraped (nothing on the hot path); TTFT and TPOT
histograms are fed by the engine's finish hook.  ``handler`` serves the text format.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .engine import Engine

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds


class _EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e, g = self.engine, self.engine.group
        counters = (
            ("molink_generated_tokens", "Tokens generated", e.tokens_generated),
            ("molink_finished_requests", "Requests finished (any reason)", e.requests_finished),
            ("molink_prompt_tokens", "Prompt tokens of the requests that ended", e.prompt_tokens_total),
            (
                "molink_cached_prompt_tokens",
                "Of those, the tokens reused from the prefix cache (not computed again)",
                e.cached_tokens_total,
            ),
            (
                "molink_drafted_tokens",
                "Tokens drafted (prompt lookup, or the draft model) and sent to be verified",
                e.drafted_tokens,
            ),
            ("molink_accepted_draft_tokens", "Of those, the ones accepted", e.accepted_tokens),
            ("molink_draft_trips", "Pipeline trips that carried drafts to verify", e.draft_trips),
            (
                "molink_loop_draft_trips",
                "Of those, the ones the last stage drafted inside the loop-back (no master crossed)",
                e.loop_draft_trips,
            ),
            ("molink_model_drafted_tokens", "Of the drafted tokens, the draft model's", e.model_drafted_tokens),
            ("molink_model_accepted_draft_tokens", "Of those, the ones accepted", e.model_accepted_tokens),
            (
                "molink_late_frames",
                "Frames of a replaced pipeline dropped: results of an old epoch, frames of workers dropped as "
                "unresponsive",
                g.late_frames + e.stale_results,
            ),
        )
        gauges = (
            ("molink_running_requests", "Requests being generated", len(e.running)),
            ("molink_queued_requests", "Requests waiting for admission", len(e.waiting)),
            ("molink_workers", "Connected workers", len(g.links)),
            ("molink_pipeline_stages", "Stages of the serving pipeline", len(g.stages)),
            ("molink_serving", "1 when the group serves", 1 if g.serving else 0),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(
            "molink_time_to_first_token_seconds", "Time to first token", buckets=_BUCKETS, registry=self.registry
        )
        self.tpot = Histogram(
            "molink_time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        engine.on_finish(self._observe)

    def _observe(self, record: dict) -> None:
        self.ttft.observe(record["ttft"])
        if record["tokens"] > 1:
            self.tpot.observe(record["tpot"])

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )
