"""`molink bench --burst`: bursts of long prompts over short decode streams, per policy.

Contract: ``burst_profile(opts, profile, shape)`` runs every policy of ``opts`` one after another on
one shaped local group (:func:`app.tools.bench.common.shaped_group`): short greedy streams decode while the
long prompts of :class:`BurstShape` arrive.  Headline: the p99 of the streams' inter-token gaps
during the burst (a gap ending between the first long arrival and the last long prompt's end)
over the calm pace (the median gap before the burst), with the long prompts' TTFT and prompt
tokens per second beside it.  Also: the gaps over the whole run, how long the burst took, the
streams' tokens/s, whether the greedy tokens were identical across policies, and every step's
timeline (:attr:`master_core.engine.Engine.on_step`) with where the time of the longest gaps
went.  ``burst_table`` prints the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
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


def burst_shape(opts: BenchOptions) -> BurstShape:
    """The burst of ``opts`` (its prompts, spacing and streams where given, else the defaults)."""
    shape = BurstShape()
    return BurstShape(
        streams=opts.burst_streams or shape.streams,
        burst_prompts=opts.burst_prompts or shape.burst_prompts,
        burst_spacing=opts.burst_spacing or shape.burst_spacing,
    )


def stall_report(token_times: list[list[float]], steps: list[dict], worst: int = 5) -> list[dict]:
    """Where the time of the ``worst`` longest gaps went: for each, the step that ended it (the
    last step ending at or before the gap's second token): its seconds, its stages' compute, the
    queue wait at the stages ending its runs, the rest (links, queues of other stages), and the
    prefill tokens of the steps in flight beside it."""
    gaps = sorted(((b - a, b) for t in token_times for a, b in zip(t, t[1:])), reverse=True)[:worst]
    out = []
    for gap, end in gaps:
        done = [s for s in steps if s["ended"] <= end + 1e-3 and s["decodes"]]
        if not done:
            continue
        s = max(done, key=lambda x: x["ended"])
        took = s["ended"] - s["began"]
        beside = [x for x in steps if x is not s and x["began"] < s["ended"] and x["ended"] > s["began"]]
        out.append(
            {
                "gap": gap,
                "step_seconds": took,
                "compute": sum(s["computes"]),
                "queued_last": s["queued"],
                "rest": took - sum(s["computes"]) - s["queued"],
                "prefill_with_it": s["prefill_tokens"],
                "prefill_beside": sum(x["prefill_tokens"] for x in beside),
                "failed_beside": sum(1 for x in beside if x["failed"]),
                "waiting": s["waiting"],
            }
        )
    return out


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


async def _run_burst(
    master: Master, name: str, shape: BurstShape, vocab: int, seed: int, dump: Path
) -> tuple[dict, list]:
    from master_core.request import FinishEvent, SamplingParams

    engine = master.engine
    engine.set_policy(policy(name, master.config.max_batch_tokens))
    steps: list[dict] = []
    engine.on_step = steps.append
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
    burst_ttft: list[float | None] = [None] * len(long)  # None: not answered within the run
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
        engine.on_step = None
        # every step's timeline, also when the run failed (what stalled it)
        dump.write_text(json.dumps([{**x, "began": x["began"] - t0, "ended": x["ended"] - t0} for x in steps]))
    failure = burster.exception() if burster.done() and not burster.cancelled() else None
    if failure is not None:
        raise failure
    complete = burster.done() and not burster.cancelled()
    end = max(t[-1] for t in stream_times if t)
    tokens = sum(len(t) for t in stream_times)
    out = gap_figures(stream_times)
    calm = gap_figures([[x for x in t if x <= t0 + shape.burst_start] for t in stream_times])
    start = t0 + shape.burst_start
    during = [b - a for t in stream_times for a, b in zip(t, t[1:]) if start < b <= burst_end]
    from master_core.workload import percentile

    p99_burst = percentile(during, 99) if during else None
    done = [t for t in burst_ttft if t is not None]
    prompt_tokens = sum(n for n, t in zip(shape.burst_prompts, burst_ttft) if t is not None)  # answered ones
    out.update(
        {
            "gap_p50_before_burst": calm["gap_p50"],  # the streams' own pace, no long prompt around
            "gap_p99_over_calm_p50": (out["gap_p99"] / calm["gap_p50"]) if calm["gap_p50"] else None,
            # the headline: gaps during the burst against the calm pace
            "burst_gaps": len(during),
            "burst_gap_p99": p99_burst,
            "burst_gap_p99_over_calm_p50": (p99_burst / calm["gap_p50"]) if p99_burst and calm["gap_p50"] else None,
            "burst_prompt_tokens_per_s": prompt_tokens / max(1e-9, burst_end - start),
            "burst_ttft": burst_ttft,
            "stalls": stall_report(stream_times, steps),
            "steps": [{**x, "began": round(x["began"] - t0, 4), "ended": round(x["ended"] - t0, 4)} for x in steps],
            "burst_complete": complete,
            "burst_seconds": burst_end - (t0 + shape.burst_start),  # first long arrival -> last one done
            "burst_prompts_answered": len(done),
            # unanswered prompts count as the whole run (a lower bound on their TTFT)
            "burst_ttft_max": max(t if t is not None else burst_end - start for t in burst_ttft),
            "burst_ttft_mean": sum(done) / len(done) if done else None,
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
            dump = opts.out / f"steps-{profile}-{name}.json"
            results[name], outputs[name] = await _run_burst(master, name, shape, vocab, opts.seed, dump)
            r = results[name]
            print(
                f"  {profile}/{name}: calm p50 {(r['gap_p50_before_burst'] or 0) * 1000:.0f} ms, burst p99 "
                f"{(r['burst_gap_p99'] or 0) * 1000:.0f} ms, ratio {r['burst_gap_p99_over_calm_p50'] or 0:.2f}; "
                f"TTFT max {r['burst_ttft_max']:.1f} s ({r['burst_prompts_answered']} of "
                f"{len(shape.burst_prompts)} answered), prompt {r['burst_prompt_tokens_per_s']:.0f} tok/s, "
                f"burst done in {r['burst_seconds']:.1f} s",
                flush=True,
            )
            for st in r["stalls"]:
                print(
                    "    gap {gap:.2f} s: its step {step_seconds:.2f} s = compute {compute:.2f} + queued at the "
                    "last stage {queued_last:.2f} + links/other queues {rest:.2f}; prefill with it {prefill_with_it}, "
                    "beside it {prefill_beside}; failed beside {failed_beside}; waiting {waiting}".format(**st),
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
        f"{'profile':<9}{'policy':<14}{'calm p50':>9}{'burst p99':>10}{'ratio':>7}{'gap max':>9}"
        f"{'TTFT max':>10}{'prompt tok/s':>13}{'burst s':>9}{'stream tok/s':>14}"
    )
    lines = [head, "-" * len(head)]
    for r in report:
        for name, f in r["policies"].items():
            lines.append(
                f"{r['profile']:<9}{name:<14}{(f['gap_p50_before_burst'] or 0) * 1000:>7.0f}ms"
                f"{(f['burst_gap_p99'] or 0) * 1000:>8.0f}ms{f['burst_gap_p99_over_calm_p50'] or 0:>7.2f}"
                f"{f['gap_max'] * 1000:>7.0f}ms{f['burst_ttft_max']:>9.1f}s{f['burst_prompt_tokens_per_s']:>13.0f}"
                f"{f['burst_seconds']:>9.1f}{f['stream_tokens_per_s']:>14.2f}"
            )
    return "\n".join(lines)
