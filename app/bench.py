"""`molink bench`: scheduling policies side by side, on a real local group or in simulation.

Contract: ``run_bench(options)`` runs every (link profile, policy) pair of ``options`` on the
same seeded Poisson workload and writes ``bench.json`` and PNG plots into ``options.out``;
it prints one table.  Real mode: a master in this process and 3 worker processes on the
default model, each worker's tunnel shaped to the profile (delay line + token bucket in user
space, both directions); the policies run one after another on the same live group, and
their greedy tokens are compared (they must be identical).  After each profile the measured
costs drive the simulator on the same workload, and the calibration error is reported.
``--simulate``: the same table for a modelled 70B-class model on 4 and 8 consumer GPUs.
``--burst``: short greedy decode streams run while several prompts of 1,000-2,000 tokens
arrive within seconds (:class:`BurstShape`); per (profile, policy) the streams' inter-token
gap p50, p99 and their ratio, side by side on one live group.  ``--concurrent N``: N greedy
clients at once through 3 local stages vs single-process transformers serving the N as one
batch (one torch thread per process), aggregate tokens/s.  ``--hops``: one stream at a time,
direct stage-to-stage hops against every hop relayed through the master
(:mod:`app.bench_hops`).  ``--simulate`` also runs ``full`` with every hop direct beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from master_core.config import MasterConfig
from master_core.costs import CostSnapshot
from master_core.scheduler import POLICIES, policy
from master_core.simulator import SimModel, simulate
from master_core.workload import BenchRequest, WorkloadShape, make_workload, summarize

from .procs import start_local_workers, stop_processes

if TYPE_CHECKING:  # the engine (torch) is imported only when a real run starts
    from master_core.server import Master

# name -> (Mbit/s, round-trip seconds); each direction gets half the round trip as delay
PROFILES: dict[str, tuple[float, float]] = {"lan": (1000.0, 0.0005), "wan": (100.0, 0.020), "slow": (20.0, 0.040)}


SIMULATED_REQUESTS = 400  # the simulator's default workload: many more requests than a real run
SIMULATED_RATE = 1.0  # requests per second with the simulator


@dataclass(frozen=True)
class BenchOptions:
    profiles: tuple[str, ...] = ("wan", "slow")
    policies: tuple[str, ...] = tuple(POLICIES)
    requests: int = 24  # per run (SIMULATED_REQUESTS with simulate)
    rate: float = 2.0  # requests per second, Poisson (SIMULATED_RATE with simulate)
    seed: int = 0
    simulate: bool = False
    single: bool = False  # one request at a time vs single-process transformers
    burst: bool = False  # bursts of long prompts over short decode streams: gap p99/median per policy
    concurrent: int = 0  # N concurrent greedy clients vs one process serving them as one batch
    hops: bool = False  # one stream at a time, direct hops vs every hop relayed, per profile
    out: Path = field(default_factory=lambda: Path("bench-results"))
    model: str = "default"
    workers: int = 3
    max_batch_tokens: int = 1024


def _progress(total: int, desc: str):  # -> tqdm
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- real runs


def _prompts(workload: list[BenchRequest], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo = min(1000, vocab // 4)  # stay clear of special tokens at the start of the vocabulary
    return [[rng.randrange(lo, vocab) for _ in range(w.prompt_tokens)] for w in workload]


async def _run_policy(
    master: Master, name: str, workload: list[BenchRequest], prompts: list[list[int]], mbps: float, bar
) -> tuple[dict, list[list[int]]]:
    from master_core.request import FinishEvent, SamplingParams

    engine = master.engine
    engine.set_policy(policy(name, master.config.max_batch_tokens))
    links = list(master.group.stages)
    before = [(k.compute_total, k.step_bytes_total, k.bytes_sent, k.bytes_received) for k in links]
    t0 = time.monotonic()
    arrivals: list[float] = [0.0] * len(workload)
    times: list[list[float]] = [[] for _ in workload]
    outputs: list[list[int]] = [[] for _ in workload]

    async def one(i: int, w: BenchRequest) -> None:
        await asyncio.sleep(max(0.0, t0 + w.arrival - time.monotonic()))
        arrivals[i] = time.monotonic()
        req = engine.submit(prompts[i], SamplingParams(max_tokens=w.output_tokens, temperature=0.0, ignore_eos=True))
        while True:
            ev = await req.events.get()
            if isinstance(ev, FinishEvent):
                if ev.reason == "error":
                    raise RuntimeError(f"request failed: {ev.error}")
                break
            times[i].append(time.monotonic())
        outputs[i] = req.output
        bar.update(1)

    await asyncio.gather(*(one(i, w) for i, w in enumerate(workload)))
    compute = [k.compute_total - b[0] for k, b in zip(links, before)]
    moved = sum(k.step_bytes_total - b[1] for k, b in zip(links, before))
    busy = list(compute)
    for k, b in zip(links, before):  # each link direction at the emulated rate
        busy.append((k.bytes_sent - b[2]) * 8 / (mbps * 1e6))
        busy.append((k.bytes_received - b[3]) * 8 / (mbps * 1e6))
    cores = os.cpu_count() or 1
    busy.append(sum(compute) / cores)  # the stages share this machine's cores
    return summarize(arrivals, times, moved, busy), outputs


@contextlib.asynccontextmanager
async def _shaped_group(opts: BenchOptions, profile: str) -> AsyncIterator[Master]:
    """A master in this process and ``opts.workers`` local worker processes (one torch thread
    each) whose tunnels are shaped to ``profile``, serving and profiled (at most 600 s);
    stopped, workers included, whatever happens."""
    from master_core.server import Master

    mbps, rtt = PROFILES[profile]
    cfg = MasterConfig(
        model=opts.model, port=0, min_workers=opts.workers, max_batch_tokens=opts.max_batch_tokens, max_running=64
    )
    master = Master(cfg)
    await master.start()
    shaping = ("--threads", "1", "--link-delay-ms", str(rtt * 1000 / 2), "--link-mbps", str(mbps))
    procs = start_local_workers(master.address, [f"stage-{i}" for i in range(opts.workers)], *shaping)
    try:
        deadline = time.monotonic() + 600
        while not (master.group.serving and master.engine.profiled):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not come up: {master.group.problem}")
            await asyncio.sleep(0.2)
        yield master
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)


async def _real_profile(opts: BenchOptions, profile: str, workload: list[BenchRequest]) -> dict:
    from master_core.request import SamplingParams

    mbps, rtt = PROFILES[profile]
    async with _shaped_group(opts, profile) as master:
        vocab = master.dims.vocab_size
        prompts = _prompts(workload, vocab, opts.seed)
        await master.engine.generate(
            prompts[0][:16], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        )  # warm-up
        results, outputs = {}, {}
        for name in opts.policies:
            bar = _progress(len(workload), f"{profile}/{name}")
            results[name], outputs[name] = await _run_policy(master, name, workload, prompts, mbps, bar)
            bar.close()
        first = next(iter(outputs.values()))
        identical = all(o == first for o in outputs.values())
        costs = master.engine.costs()
        calibration = (
            calibrate(costs, master.group.kv_tokens, workload, results, opts.max_batch_tokens) if costs else None
        )
        return {
            "profile": profile,
            "mbps": mbps,
            "rtt_s": rtt,
            "policies": results,
            "tokens_identical": identical,
            "measured_costs": costs.__dict__ if costs else None,
            "calibration": calibration,
        }


def calibrate(
    costs: CostSnapshot, kv_tokens: int, workload: list[BenchRequest], real: dict[str, dict], max_batch_tokens: int
) -> dict:
    """Simulate every policy with the costs measured in the real run, on the same workload,
    and report the simulator's error against the real figures.  The measured stage times
    already include the CPU contention between the local stages, so cores are not modelled
    again."""
    out: dict = {}
    for name, r in real.items():
        sim = simulate(SimModel(costs, kv_tokens), workload, policy(name, max_batch_tokens))
        out[name] = {
            k: {"real": r[k], "simulated": sim[k], "error": (sim[k] - r[k]) / r[k]}
            for k in ("output_tokens_per_s", "ttft_p50", "tpot_p50")
            if r.get(k)
        }
    return out


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
    complete = burster.done() and not burster.cancelled() and burster.exception() is None
    if burster.done() and not burster.cancelled() and burster.exception() is not None:
        raise burster.exception()  # type: ignore[misc]
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


async def _burst_profile(opts: BenchOptions, profile: str, shape: BurstShape) -> dict:
    from master_core.request import SamplingParams

    mbps, rtt = PROFILES[profile]
    async with _shaped_group(opts, profile) as master:
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
        costs = master.engine.costs()
        return {
            "profile": profile,
            "mbps": mbps,
            "rtt_s": rtt,
            "policies": results,
            "tokens_identical": identical,
            "measured_costs": costs.__dict__ if costs else None,
        }


def _burst_table(report: list[dict]) -> str:
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


# --------------------------------------------------------------------------- concurrent clients


async def concurrent_clients(opts: BenchOptions, clients: int, new_tokens: int = 64, prompt: int = 16) -> dict:
    """``clients`` greedy requests at once through the local pipeline (unshaped tunnels, one
    torch thread per worker), twice (the second run is measured: the first lets the engine
    tune its micro-batch count), against single-process transformers generating the same
    prompts as one batch with one torch thread; aggregate output tokens/s of each."""
    import torch
    from transformers import AutoModelForCausalLM

    from master_core.request import FinishEvent, SamplingParams
    from master_core.server import Master
    from worker_core import model_source

    folder = model_source.resolve(opts.model)
    rng = random.Random(opts.seed)
    prompts = [[rng.randrange(1000, 40000) for _ in range(prompt)] for _ in range(clients)]

    def hf_run() -> dict:
        torch.set_num_threads(1)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        batch = torch.tensor(prompts)
        with torch.inference_mode():
            model.generate(batch, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            model.generate(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            total = time.perf_counter() - t0
        return {"seconds": total, "tokens_per_s": clients * new_tokens / total}

    hf = await asyncio.to_thread(hf_run)
    master = Master(MasterConfig(model=opts.model, port=0, min_workers=opts.workers))
    await master.start()
    procs = start_local_workers(master.address, [f"stage-{i}" for i in range(opts.workers)], "--threads", "1")
    runs: list[dict] = []
    try:
        while not (master.group.serving and master.engine.profiled):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited")
            await asyncio.sleep(0.2)
        engine = master.engine
        greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

        async def one(p: list[int]) -> tuple[int, float]:
            req = engine.submit(p, greedy)
            last = time.perf_counter()
            while not isinstance(await req.events.get(), FinishEvent):
                last = time.perf_counter()
            return len(req.output), last

        for _ in range(2):
            t0 = time.perf_counter()
            done = await asyncio.gather(*(one(p) for p in prompts))
            seconds = max(t for _, t in done) - t0
            runs.append(
                {
                    "seconds": seconds,
                    "tokens_per_s": sum(n for n, _ in done) / seconds,
                    "microbatches_end": engine.slots(engine.costs()),
                }
            )
        tuner = getattr(engine, "tuner", None)
        tuned = tuner.describe() if tuner is not None and hasattr(tuner, "describe") else None
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)
    return {
        "clients": clients,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt,
        "transformers_one_batch": hf,
        "molink_runs": runs,
        "tuner": tuned,
        "ratio": runs[-1]["tokens_per_s"] / hf["tokens_per_s"],
    }


# --------------------------------------------------------------------------- one request


async def single_request(opts: BenchOptions, new_tokens: int = 64, long_prompt: int = 500) -> dict:
    """One request at a time: decode tokens/s and TTFT of a ``long_prompt``-token prompt, for
    the 3-stage pipeline (unshaped local tunnels) and single-process transformers, same run."""
    import torch
    from transformers import AutoModelForCausalLM

    from master_core.request import FinishEvent, SamplingParams
    from master_core.server import Master
    from worker_core import model_source

    folder = model_source.resolve(opts.model)
    rng = random.Random(opts.seed)
    short = [rng.randrange(1000, 40000) for _ in range(16)]
    long = [rng.randrange(1000, 40000) for _ in range(long_prompt)]

    def hf_run() -> dict:
        # Any: transformers types generate()'s self as a protocol its own auto models do not meet
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.inference_mode():
            model.generate(torch.tensor([short]), max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            model.generate(torch.tensor([short]), max_new_tokens=1, min_new_tokens=1, do_sample=False)
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(torch.tensor([short]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            total = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(torch.tensor([long]), max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
        return {"decode_tokens_per_s": (new_tokens - 1) / (total - one), "ttft_long_s": ttft}

    hf = await asyncio.to_thread(hf_run)
    master = Master(MasterConfig(model=opts.model, port=0, min_workers=opts.workers))
    await master.start()
    procs = start_local_workers(master.address, [f"stage-{i}" for i in range(opts.workers)])
    try:
        while not (master.group.serving and master.engine.profiled):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited")
            await asyncio.sleep(0.2)
        greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        await master.engine.generate(short, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        req = master.engine.submit(short, greedy)
        times = []
        while not isinstance(await req.events.get(), FinishEvent):
            times.append(time.perf_counter())
        t0 = time.perf_counter()
        req = master.engine.submit(long, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while not isinstance(await req.events.get(), FinishEvent):
            pass
        ttft = time.perf_counter() - t0
        ours = {
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "ttft_long_s": ttft,
            "stages": len(master.group.stages),
        }
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)
    return {
        "new_tokens": new_tokens,
        "long_prompt_tokens": long_prompt,
        "transformers": hf,
        "molink": ours,
        "decode_ratio": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
    }


# --------------------------------------------------------------------------- simulation


GPU_CARD_BYTES = 23 * 10**9  # a 24 GB card with 1 GB kept back
GPU_MEMORY_BANDWIDTH = 900e9  # bytes/s of an RTX 3090/4090-class card


def gpu_model(gpus: int, profile: str, direct: bool = False) -> SimModel:
    """Llama-3-70B (80 layers, hidden 8192, fp16 compute and activations) on 24 GB cards: at
    fp16 weights when ``gpus`` cards hold them (8), else at the group precision ``int4``.
    ``direct``: every hop between stages goes straight from card to card, not through the master.

    Per layer, a decode step is memory-bound: it reads the layer's weights at the quantized
    size the planner counts (:meth:`ModelDims.layer_bytes`: 1.71 GB in fp16, 0.56 GB in int4
    with its int8 value and down projections) at ~900 GB/s; each extra token costs about
    2 x 0.86 GFLOP at ~100 TFLOP/s effective, 8.6 us.  The KV budget is the smallest stage's
    room once the planner has placed the quantized weights (:func:`kv_tokens_on_cards`)."""
    from master_core.simulator import LLAMA3_70B, kv_tokens_on_cards
    from worker_core.precision import Precision
    from worker_core.wire import logits_row_width

    mbps, rtt = PROFILES[profile]
    precision = Precision.NONE if gpus >= 8 else Precision.INT4
    layers = LLAMA3_70B.num_layers // gpus
    fixed_per_layer = LLAMA3_70B.layer_bytes(0, precision, 2) / GPU_MEMORY_BANDWIDTH
    costs = CostSnapshot(
        stage_fixed=(layers * fixed_per_layer,) * gpus,
        stage_per_token=(layers * 8.6e-6,) * gpus,
        link_rtt=(rtt,) * gpus,
        link_bandwidth=(mbps * 1e6 / 8,) * gpus,
        hidden_bytes_per_token=LLAMA3_70B.hidden_size * 2,
        logits_bytes_per_row=4 * logits_row_width(MasterConfig.logits_topk, LLAMA3_70B.vocab_size),  # float32
        direct=(True,) * (gpus - 1) if direct else (),
    )
    kv_tokens = kv_tokens_on_cards(LLAMA3_70B, gpus, GPU_CARD_BYTES, precision)
    return SimModel(costs, kv_tokens=kv_tokens)


# --------------------------------------------------------------------------- report


def _table(rows: list[tuple[str, str, dict]]) -> str:
    head = (
        f"{'setup':<16}{'policy':<20}{'tok/s':>8}{'req/s':>7}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'TPOT p50':>10}{'TPOT p99':>10}{'B/tok':>9}{'bound':>8}{'frac':>6}"
    )
    lines = [head, "-" * len(head)]
    for setup, name, r in rows:

        def ms(v):
            return f"{v * 1000:.0f}ms" if v is not None else "-"

        bound = r.get("pipeline_bound_tokens_per_s")
        lines.append(
            f"{setup:<16}{name:<20}{r['output_tokens_per_s']:>8.1f}{r['requests_per_s']:>7.2f}"
            f"{r['ttft_p50']:>9.2f}s{r['ttft_p99']:>9.2f}s{ms(r['tpot_p50']):>10}{ms(r['tpot_p99']):>10}"
            f"{r['bytes_per_output_token']:>9.0f}{(bound or 0):>8.1f}{r.get('fraction_of_bound', 0):>6.2f}"
        )
    return "\n".join(lines)


def _plot(rows: list[tuple[str, str, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(s for s, _, _ in rows))
    names = list(dict.fromkeys(n for _, n, _ in rows))
    metrics = [("output_tokens_per_s", "output tokens/s"), ("tpot_p99", "TPOT p99 (s)"), ("ttft_p50", "TTFT p50 (s)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    width = 0.8 / len(names)
    for ax, (key, label) in zip(axes, metrics):
        for j, n in enumerate(names):
            vals = [next((r[key] or 0) for s, nn, r in rows if s == setup and nn == n) for setup in setups]
            ax.bar([i + j * width for i in range(len(setups))], vals, width, label=n)
        if key == "output_tokens_per_s":
            for i, setup in enumerate(setups):
                b = (
                    next(r.get("pipeline_bound_tokens_per_s") for s, nn, r in rows if s == setup and nn == "full")
                    if any(s == setup and nn == "full" for s, nn, _ in rows)
                    else None
                )
                if b:
                    ax.hlines(
                        b,
                        i - width / 2,
                        i + 0.8 - width / 2,
                        colors="k",
                        linestyles="dashed",
                        label="pipeline bound (full)" if i == 0 else None,
                    )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(setups))], setups)
        ax.set_title(label)
        if key != "output_tokens_per_s":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run_bench(opts: BenchOptions) -> int:
    opts.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()},
        "created": time.time(),
    }
    rows: list[tuple[str, str, dict]] = []
    if opts.burst:
        report["burst"] = []
        for profile in opts.profiles:
            report["burst"].append(await _burst_profile(opts, profile, BurstShape()))
        (opts.out / "burst.json").write_text(json.dumps(report, indent=2, default=float))
        print(_burst_table(report["burst"]))
        for r in report["burst"]:
            print(f"{r['profile']}: greedy tokens identical across policies: {r['tokens_identical']}")
        print(f"wrote {opts.out / 'burst.json'}")
        return 0
    if opts.hops:
        from .bench_hops import hops_profile, hops_table

        report["hops"] = [await hops_profile(opts, profile) for profile in opts.profiles]
        (opts.out / "hops.json").write_text(json.dumps(report, indent=2, default=float))
        print(hops_table(report["hops"]))
        print(f"wrote {opts.out / 'hops.json'}")
        return 0
    if opts.concurrent:
        res = await concurrent_clients(opts, opts.concurrent)
        (opts.out / "concurrent.json").write_text(json.dumps(res, indent=2, default=float))
        hf = res["transformers_one_batch"]
        for i, r in enumerate(res["molink_runs"]):
            print(
                f"{res['clients']} clients, run {i + 1}: molink {opts.workers} stages {r['tokens_per_s']:.1f} tok/s "
                f"(micro-batches at the end: {r['microbatches_end']})"
            )
        print(f"transformers, one process, one batch of {res['clients']}: {hf['tokens_per_s']:.1f} tok/s")
        print(f"ratio (run 2 / transformers): {res['ratio']:.2f}; tuner: {res['tuner']}")
        return 0
    if opts.single:
        res = await single_request(opts)
        (opts.out / "single.json").write_text(json.dumps(res, indent=2))
        hf, ours = res["transformers"], res["molink"]
        print(
            f"decode tokens/s, one request: molink {ours['stages']} stages {ours['decode_tokens_per_s']:.1f}, "
            f"transformers one process {hf['decode_tokens_per_s']:.1f} (ratio {res['decode_ratio']:.2f})"
        )
        print(
            f"time to first token, {res['long_prompt_tokens']}-token prompt: molink {ours['ttft_long_s']:.2f} s, "
            f"transformers {hf['ttft_long_s']:.2f} s"
        )
        return 0
    if opts.simulate:
        workload = make_workload(opts.requests, opts.rate, opts.seed)
        report["simulated"] = []
        for gpus in (4, 8):
            for profile in opts.profiles:
                res = {
                    name: simulate(gpu_model(gpus, profile), workload, policy(name, opts.max_batch_tokens))
                    for name in opts.policies
                }
                # the full policy side by side: every hop relayed through the master vs every hop direct
                full = policy("full", opts.max_batch_tokens)
                relayed = res.get("full") or simulate(gpu_model(gpus, profile), workload, full)
                direct = simulate(gpu_model(gpus, profile, direct=True), workload, full)
                report["simulated"].append({"gpus": gpus, "profile": profile, "policies": res, "direct": direct})
                rows += [(f"{gpus}gpu/{profile}", n, r) for n, r in res.items()]
                print(
                    f"{gpus}gpu/{profile} full, relayed vs direct hops: "
                    f"{relayed['output_tokens_per_s']:.1f} vs {direct['output_tokens_per_s']:.1f} tok/s, "
                    f"TPOT p50 {relayed['tpot_p50'] * 1000:.0f} vs {direct['tpot_p50'] * 1000:.0f} ms"
                )
        _plot(
            rows,
            opts.out / "bench-simulated.png",
            f"simulated 70B-class model, {opts.requests} requests at {opts.rate}/s",
        )
        name = "bench-simulated.json"
    else:
        workload = make_workload(opts.requests, opts.rate, opts.seed, WorkloadShape())
        report["real"] = []
        for profile in opts.profiles:
            res = await _real_profile(opts, profile, workload)
            report["real"].append(res)
            rows += [(profile, n, r) for n, r in res["policies"].items()]
        _plot(
            rows,
            opts.out / "bench.png",
            f"SmolLM2-135M, {opts.workers} CPU stages, {opts.requests} requests at {opts.rate}/s",
        )
        name = "bench.json"
    (opts.out / name).write_text(json.dumps(report, indent=2, default=float))
    print(_table(rows))
    for r in report.get("real", []):
        print(f"{r['profile']}: greedy tokens identical across policies: {r['tokens_identical']}")
        for name, figures in (r["calibration"] or {}).items():
            errs = ", ".join(f"{k} {v['error']:+.0%}" for k, v in figures.items())
            print(f"  simulator error vs real, {name}: {errs}")
    print(f"wrote {opts.out / name} and plots in {opts.out}")
    return 0
