"""The local dashboard: a page in ``assets/dashboard`` and the JSON state it polls.

Contract: ``Dashboard(engine, model_id, assets_dir)`` serves ``/dashboard`` (the page),
``/dashboard/static/{name}`` (its script and style; no CDN: machines are often offline) and
``/dashboard/api/state`` (members, pipeline, time series, queue, recent errors) and
``/dashboard/api/steps`` (the engine's last step timelines, :attr:`Engine.steps`, with ``now`` on
the same monotonic clock, and the cost model's current fit, ``costs``: where a slow stream's time
went, and what the scheduler believed while it planned).  ``start()``
samples the engine once a second into ten minutes of history; ``await stop()`` ends it.
Recent errors come from one handler per process on the ``molink`` logger
(:meth:`RecentErrors.installed`), never one per dashboard.  Access control (Host,
Origin, token) is :mod:`master_core.security`'s job.  Knows nothing about Qt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from pathlib import Path
from statistics import mean

from aiohttp import web

from .engine import Engine

HISTORY = 600  # samples, one per second
SAMPLE_SECONDS = 1.0
_RECENT: RecentErrors | None = None  # see RecentErrors.installed


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors of the ``molink`` loggers (never prompt text)."""

    def __init__(self, size: int = 50) -> None:
        super().__init__(level=logging.WARNING)
        self.items: deque[dict] = deque(maxlen=size)

    @staticmethod
    def installed() -> RecentErrors:
        """The process's one handler on the ``molink`` logger, installed on first use: every
        dashboard of this process reads it (a logger is process-global; so are its records)."""
        global _RECENT
        if _RECENT is None:
            _RECENT = RecentErrors()
            logging.getLogger("molink").addHandler(_RECENT)
        return _RECENT

    def emit(self, record: logging.LogRecord) -> None:
        self.items.append(
            {
                "at": record.created,
                "level": record.levelname.lower(),
                "source": record.name,
                "message": record.getMessage()[:500],
            }
        )


class Dashboard:
    def __init__(self, engine: Engine, model_id: str, assets_dir: Path) -> None:
        self.engine = engine
        self.model_id = model_id
        self.assets = assets_dir
        self.series: deque[dict] = deque(maxlen=HISTORY)
        self.errors = RecentErrors.installed()
        self._task: asyncio.Task | None = None
        self._last_tokens = 0
        self._last_at = time.monotonic()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/dashboard", self.page),
            web.get("/dashboard/static/{name}", self.static),
            web.get("/dashboard/api/state", self.state),
            web.get("/dashboard/api/steps", self.steps),
        ]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            self.sample()

    def sample(self) -> None:
        now = time.monotonic()
        e = self.engine
        dt = max(1e-6, now - self._last_at)
        fresh = [r for r in e.recent if r["at"] > self._last_at - 1e-9]
        self.series.append(
            {
                "t": time.time(),
                "tokens_per_s": (e.tokens_generated - self._last_tokens) / dt,
                "ttft": mean(r["ttft"] for r in fresh) if fresh else None,
                "tpot": mean(r["tpot"] for r in fresh if r["tokens"] > 1)
                if any(r["tokens"] > 1 for r in fresh)
                else None,
                "running": len(e.running),
                "queued": len(e.waiting),
            }
        )
        self._last_tokens, self._last_at = e.tokens_generated, now

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.assets / "index.html", headers={"Cache-Control": "no-store"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ("app.js", "style.css", "molink.svg"):
            raise web.HTTPNotFound()
        path = self.assets / name if name != "molink.svg" else self.assets.parent / name
        return web.FileResponse(path)

    async def steps(self, request: web.Request) -> web.Response:
        costs = self.engine.costs()
        snapshot = {
            "now": self.engine.clock(),
            "steps": list(self.engine.steps),  # records are never changed
            "costs": None if costs is None else dataclasses.asdict(costs),
        }
        body = await asyncio.to_thread(json.dumps, snapshot)  # up to a few MB: off the loop
        return web.Response(text=body, content_type="application/json")

    async def state(self, request: web.Request) -> web.Response:
        e, g = self.engine, self.engine.group
        members = g.describe()
        pipeline = []
        for i, link in enumerate(g.stages):
            a = link.assignment
            compute = mean(link.compute_seconds) if link.compute_seconds else None
            net = link.link_cost.estimate()  # (rtt seconds, bytes/s) fitted from real steps
            pipeline.append(
                {
                    "name": link.name,
                    "layers": [a.layer_start, a.layer_end] if a else None,
                    "compute_ms": compute * 1e3 if compute is not None else None,
                    "rtt_ms": net[0] * 1e3 if net else None,
                    "mbps": net[1] * 8 / 1e6 if net and net[1] != float("inf") else None,
                    # how this stage's input arrives: from the master, over a direct hop, or relayed
                    "hop_in": None if i == 0 or i > len(g.hops) else g.hops[i - 1].describe(),
                }
            )
        queue = [
            {
                "id": r.id,
                "state": r.state.value,
                "prompt_tokens": len(r.prompt),
                "output_tokens": len(r.output),
                "max_tokens": r.params.max_tokens,
            }
            for r in [*e.running.values(), *e.waiting]
        ]
        return web.json_response(
            {
                "model": self.model_id,
                "status": "serving" if g.serving else "not serving",
                "state": g.state.value,
                "problem": g.problem,
                "epoch": g.epoch,
                "members": members,
                "pipeline": pipeline,
                # the last stage feeding greedy tokens straight back to the first (Step.loop)
                "loop_back": g.loop_back.describe() if len(g.stages) > 1 else None,
                "series": list(self.series),
                "queue": queue,
                "errors": list(self.errors.items)[::-1],
                "totals": {
                    "tokens": e.tokens_generated,
                    "requests": e.requests_finished,
                    # prompt tokens of ended requests reused from the prefix cache (0..1; None before any)
                    "cache_hit_rate": e.cached_tokens_total / e.prompt_tokens_total if e.prompt_tokens_total else None,
                    # speculative decoding: drafts accepted of those sent (0..1; None before any)
                    "draft_acceptance": e.accepted_tokens / e.drafted_tokens if e.drafted_tokens else None,
                },
            },
            headers={"Cache-Control": "no-store"},
        )
