"""`molink bench --burst`: bursts of long prompts over short decode streams, per policy.

Contract: ``burst_profile(opts, profile, shape)`` runs every policy of ``opts`` one after another on
one shaped local group (:func:`app.tools.bench.common.shaped_group`): short greedy streams decode while the
long prompts of :class:`BurstShape` arrive; it reports the streams' inter-token gaps (p50, p99,
their ratio, the calm pace before the burst), how long the burst took, the streams' tokens/s and
whether the greedy tokens were identical across policies.  ``burst_table`` prints the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from master_core.scheduler import policy

if TYPE_CHECKING:  # the engine (torch) is imported only when a real run starts
    from master_core.server import Master

from .common import profile_report, shaped_group
from .options import BenchOptions

# --------------------------------------------------------------------------- bursts


@dataclass(frozen=True)
class BurstShape:
    """Short greedy streams decoding while long prompts arrive in a burst (seconds, tokens)."""

    streams: int = 4
    stream_prompt: int = 16
    burst_prompts: tuple[int, ...] = (1200, 2000, 1500, 1000)
    burst_start: float = 4.0  # after the streams started
    burst_spacing: float = 1.0  # between the burst's arrivals
    burst_output: int = 4
    tail: float = 3.0  # the streams keep decoding this long after the last burst request finished
    limit: float = 150.0  # a run never lasts longer (the streams are cancelled)


def gap_figures(token_times: list[list[float]]) -> dict:
    """p50, p99 and p99/p50 of the gaps between consecutive tokens of each stream."""
    from master_core.workload import percentile

    gaps = [b - a for t in token_times for a, b in zip(t, t[1:])]
    p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
    return {
        "gaps": len(gaps),
        "gap_p50": p50,
        "gap_p99": p99,
        "gap_max": max(gaps) if gaps else None,
        "gap_ratio": (p99 / p50) if p50 and p99 else None,
    }


async def _run_burst(master: Master, name: str, shape: BurstShape, vocab: int, seed: int) -> tuple[dict, list]:
    from master_core.request import FinishEvent, SamplingParams

    engine = master.engine
    engine.set_policy(policy(name, master.config.max_batch_tokens))
    rng = random.Random(seed)
    lo = min(1000, vocab // 4)
    short = [[rng.randrange(lo, vocab) for _ in range(shape.stream_prompt)] for _ in range(shape.streams)]
    long = [[rng.randrange(lo, vocab) for _ in range(n)] for n in shape.burst_prompts]
    room = min(master.dims.max_positions - shape.stream_prompt - 1, master.group.kv_tokens // 16, 1500)
    greedy_long = SamplingParams(max_tokens=room, temperature=0.0, ignore_eos=True)
    t0 = time.monotonic()
    streams = [engine.submit(p, greedy_long) for p in short]
    stream_times: list[list[float]] = [[] for _ in streams]
    stream_out: list[list[int]] = [[] for _ in streams]
    burst_done = asyncio.Event()
    burst_ttft: list[float] = [0.0] * len(long)
    burst_out: list[list[int]] = [[] for _ in long]

    async def stream(i: int) -> None:
        req = streams[i]
        while True:
            ev = await req.events.get()
            if isinstance(ev, FinishEvent):
                break
            stream_times[i].append(time.monotonic())
        stream_out[i] = list(req.output)

    async def burst(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + shape.burst_start + i * shape.burst_spacing - time.monotonic()))
        arrived = time.monotonic()
        req = engine.submit(long[i], SamplingParams(max_tokens=shape.burst_output, temperature=0.0, ignore_eos=True))
        first = None
        while True:
            ev = await req.events.get()
            if isinstance(ev, FinishEvent):
                if ev.reason == "error":
                    raise RuntimeError(f"request failed: {ev.error}")
                break
            first = first or time.monotonic()
        burst_ttft[i] = (first or time.monotonic()) - arrived
        burst_out[i] = list(req.output)

    async def bursts() -> None:
        try:
            await asyncio.gather(*(burst(i) for i in range(len(long))))
        finally:
            burst_done.set()

    readers = [asyncio.create_task(stream(i)) for i in range(len(streams))]
    burster = asyncio.create_task(bursts())
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(burst_done.wait(), shape.limit)
        burst_end = time.monotonic()
        await asyncio.sleep(shape.tail)
    finally:
        for req in streams:
            engine.cancel(req)
        await asyncio.wait(readers, timeout=10)
        if not burster.done():
            burster.cancel()
    failure = burster.exception() if burster.done() and not burster.cancelled() else None
    if failure is not None:
        raise failure
    complete = burster.done() and not burster.cancelled()
    end = max(t[-1] for t in stream_times if t)
    tokens = sum(len(t) for t in stream_times)
    out = gap_figures(stream_times)
    calm = gap_figures([[x for x in t if x <= t0 + shape.burst_start] for t in stream_times])
    out.update(
        {
            "gap_p50_before_burst": calm["gap_p50"],  # the streams' own pace, no long prompt around
            "gap_p99_over_calm_p50": (out["gap_p99"] / calm["gap_p50"]) if calm["gap_p50"] else None,
            "burst_complete": complete,
            "burst_seconds": burst_end - (t0 + shape.burst_start),  # first long arrival -> last one done
            "burst_ttft_max": max(burst_ttft),
            "burst_ttft_mean": sum(burst_ttft) / len(burst_ttft),
            "stream_tokens": tokens,
            "stream_tokens_per_s": tokens / (end - t0),
            "stream_token_times": [[round(x - t0, 4) for x in t] for t in stream_times],
            "microbatches_end": engine.slots(engine.costs()),
        }
    )
    # greedy outputs compared across policies: streams cut at the shortest stream, bursts whole
    return out, [stream_out, burst_out]


async def burst_profile(opts: BenchOptions, profile: str, shape: BurstShape) -> dict:
    from master_core.request import SamplingParams

    async with shaped_group(opts, profile) as master:
        vocab = master.dims.vocab_size
        await master.engine.generate([1000 + i for i in range(16)], SamplingParams(max_tokens=4, temperature=0))
        results, outputs = {}, {}
        for name in opts.policies:
            results[name], outputs[name] = await _run_burst(master, name, shape, vocab, opts.seed)
            r = results[name]
            print(
                f"  {profile}/{name}: gap p50 {r['gap_p50'] * 1000:.0f} ms, p99 {r['gap_p99'] * 1000:.0f} ms, "
                f"ratio {r['gap_ratio']:.2f}, p99 / calm p50 {r['gap_p99_over_calm_p50'] or 0:.2f}, "
                f"burst done in {r['burst_seconds']:.1f} s",
                flush=True,
            )
        first = next(iter(outputs.values()))
        cut = min(len(s) for o in outputs.values() for s in o[0])
        identical = all(
            o[1] == first[1] and [s[:cut] for s in o[0]] == [s[:cut] for s in first[0]] for o in outputs.values()
        )
        return profile_report(master, profile, results, identical)


def burst_table(report: list[dict]) -> str:
    head = (
        f"{'profile':<9}{'policy':<14}{'calm p50':>9}{'gap p50':>9}{'gap p99':>9}{'ratio':>7}{'gap max':>9}"
        f"{'burst s':>9}{'TTFT max':>10}{'stream tok/s':>14}"
    )
    lines = [head, "-" * len(head)]
    for r in report:
        for name, f in r["policies"].items():
            lines.append(
                f"{r['profile']:<9}{name:<14}{(f['gap_p50_before_burst'] or 0) * 1000:>7.0f}ms"
                f"{f['gap_p50'] * 1000:>7.0f}ms{f['gap_p99'] * 1000:>7.0f}ms"
                f"{f['gap_ratio']:>7.2f}{f['gap_max'] * 1000:>7.0f}ms{f['burst_seconds']:>9.1f}"
                f"{f['burst_ttft_max']:>9.1f}s{f['stream_tokens_per_s']:>14.2f}"
            )
    return "\n".join(lines)
