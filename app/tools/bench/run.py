"""`molink bench`: scheduling policies side by side, on a real local group or in simulation.

Contract: ``run_bench(options)`` runs every (link profile, policy) pair of ``options`` on the
same seeded Poisson workload and writes ``bench.json`` and PNG plots into ``options.out``;
it prints one table.  Real mode: a master in this process and 3 worker processes on the
default model, each worker's tunnel shaped to the profile (delay line + token bucket in user
space, both directions); the policies run one after another on the same live group, and
their greedy tokens are compared (they must be identical).  After each profile the measured
costs drive the simulator on the same workload, and the calibration error is reported.  Each
real run's report holds, beside its percentiles, every request's time to first token
(``ttfts``, in the workload's order) for comparing the simulator request by request.
``--repeats N``: each profile's group runs N workloads (seeds ``seed`` to ``seed + N - 1``), each
calibrated, and the report gives each figure's median calibration error over them.
``--simulate``: the same table for a modelled 70B-class model on 4 and 8 consumer GPUs.
``--burst``: short greedy decode streams run while several prompts of 1,000-2,000 tokens
arrive within seconds; per (profile, policy) the streams' inter-token gap p50, p99 and their
ratio, side by side on one live group (:mod:`app.tools.bench.burst`).  ``--concurrent N`` and
``--single``: MoLink's local stages against one transformers process (:mod:`app.tools.bench.local`).
``--hops``: one stream at a time, direct stage-to-stage hops against every hop relayed through
the master (:mod:`app.tools.bench.hops`).  ``--speculative``: copy, edit, summarize and open chat,
decode tokens/s with and without prompt-lookup speculation (:mod:`app.tools.bench.speculative`).
``--simulate`` also runs ``full`` with every hop direct beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from master_core.config import MasterConfig
from master_core.costs import CostSnapshot, curve_seconds
from master_core.scheduler import policy
from master_core.simulator import SimModel, simulate
from master_core.workload import BenchRequest, WorkloadShape, make_workload, summarize, ttfts

from .common import profile_report, shaped_group
from .idle import IDLE_SIZES, idle_curves, physics_curves
from .options import PROFILES, BenchOptions

if TYPE_CHECKING:  # the engine (torch) is imported only when a real run starts
    from master_core.server import Master


COST_SAMPLE_SECONDS = 0.5  # how often a real run records the costs the engine plans with


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
    steps: list[dict] = []  # every step's timeline (the calibration compares the simulator's steps with them)
    engine.on_step = steps.append
    cpu_before, copied_before = _cpu_seconds(), engine.copies.compute_seconds
    fits: list[tuple[float, dict]] = []  # the costs the engine planned with, as they moved
    # (time, CPU seconds used so far by all but the workers, and by the copies)
    others: list[tuple[float, float, float]] = []

    async def watch_costs() -> None:  # what the calibration replays
        while True:
            costs = engine.costs()
            now = round(time.monotonic() - t0, 3)
            if costs is not None and (not fits or fits[-1][1] != dataclasses.asdict(costs)):
                fits.append((now, dataclasses.asdict(costs)))
            cpu = _cpu_seconds()
            others.append((now, cpu["machine_busy"] - cpu["workers"], engine.copies.compute_seconds))
            await asyncio.sleep(COST_SAMPLE_SECONDS)

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
            if ev.token_id >= 0:  # not the text held back until the end (a token_id -1 event before the finish)
                times[i].append(time.monotonic())
        outputs[i] = req.output
        bar.update(1)

    watcher = asyncio.create_task(watch_costs())
    try:
        await asyncio.gather(*(one(i, w) for i, w in enumerate(workload)))
    finally:
        engine.on_step = None
        watcher.cancel()
    compute = [k.compute_total - b[0] for k, b in zip(links, before)]
    moved = sum(k.step_bytes_total - b[1] for k, b in zip(links, before))
    busy = list(compute)
    for k, b in zip(links, before):  # each link direction at the emulated rate
        busy.append((k.bytes_sent - b[2]) * 8 / (mbps * 1e6))
        busy.append((k.bytes_received - b[3]) * 8 / (mbps * 1e6))
    cores = os.cpu_count() or 1
    busy.append(sum(compute) / cores)  # the stages share this machine's cores
    cpu = {k: v - cpu_before[k] for k, v in _cpu_seconds().items()}
    cpu["copies"] = engine.copies.compute_seconds - copied_before  # of the workers' CPU
    timeline = [{**x, "began": round(x["began"] - t0, 4), "ended": round(x["ended"] - t0, 4)} for x in steps]
    figures = summarize(arrivals, times, moved, busy)
    extra = {"ttfts": ttfts(arrivals, times), "cpu_seconds": cpu, "cost_series": fits}
    extra |= {"other_cores": _rates(others, 1), "copy_cores": _rates(others, 2)}
    return {**figures, **extra, "steps": timeline}, outputs


def _rates(samples: list[tuple[float, float, float]], k: int) -> list[tuple[float, float]]:
    """Per interval between two ``samples`` (time, then cumulative CPU seconds), the cores field ``k``
    kept busy: (the interval's start, cores, at least 0)."""
    return [(a[0], max(0.0, (b[k] - a[k]) / (b[0] - a[0]))) for a, b in zip(samples, samples[1:]) if b[0] > a[0]]


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far: by this process (the master), by its children (the workers),
    and by the whole machine (busy, of all cores); and the wall clock.  Where the machine's
    cores went during a run, beyond the stages' compute."""
    import psutil

    me = psutil.Process()
    children = 0.0
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        children += t.user + t.system
    mine = me.cpu_times()
    machine = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq", "steal")  # guest time is counted in user
    return {
        "master": mine.user + mine.system,
        "workers": children,
        "machine_busy": sum(getattr(machine, k, 0.0) for k in busy),
        "wall": time.monotonic(),
    }


async def _real_profile(opts: BenchOptions, profile: str, workloads: list[list[BenchRequest]]) -> dict:
    """One profile's group runs each workload (``opts.policies`` one after another on each) and
    each run is calibrated; the first run's figures and calibration are the report's
    ``policies`` and ``calibration``, the later runs are ``repeats``, and ``calibration_median``
    is each figure's median error over all runs (:func:`median_calibration`)."""
    from master_core.request import SamplingParams

    mbps = PROFILES[profile][0]
    async with shaped_group(opts, profile) as master:
        vocab = master.dims.vocab_size
        warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        await master.engine.generate(_prompts(workloads[0], vocab, opts.seed)[0][:16], warm)  # warm-up
        sizes = [BenchRequest(0.0, n, 1) for n in IDLE_SIZES if n <= opts.max_batch_tokens]
        idle = await idle_curves(master, _prompts(sizes, vocab, opts.seed + 1))  # not the workload's prompts
        layers = stage_layers(master)
        runs: list[dict] = []
        for k, workload in enumerate(workloads):
            prompts = _prompts(workload, vocab, opts.seed + k)
            results, outputs = {}, {}
            for name in opts.policies:
                bar = _progress(len(workload), f"{profile}/{name}" + (f" #{k + 1}" if len(workloads) > 1 else ""))
                results[name], outputs[name] = await _run_policy(master, name, workload, prompts, mbps, bar)
                bar.close()
            first = next(iter(outputs.values()))
            costs = master.engine.costs()
            curves = tuple(link.stage_cost.curve() for link in master.group.stages)
            physics = physics_curves(curves, idle) if len(idle) == len(curves) else curves
            calibration = (
                calibrate(costs, master.group.kv_tokens, workload, results, opts.max_batch_tokens, layers, physics)
                if costs
                else None
            )
            runs.append(
                {
                    "seed": opts.seed + k,
                    "policies": results,
                    "tokens_identical": all(o == first for o in outputs.values()),
                    "calibration": calibration,
                    "costs": dataclasses.asdict(costs) if costs else None,  # what this run was calibrated with
                    "stage_curves": curves,
                }
            )
        report = profile_report(master, profile, runs[0]["policies"], all(r["tokens_identical"] for r in runs))
        return {
            **report,
            "calibration": runs[0]["calibration"],
            "repeats": runs[1:],
            "calibration_median": median_calibration([r["calibration"] for r in runs]),
            "costs": runs[0]["costs"],
            "kv_tokens": master.group.kv_tokens,
            "stage_layers": layers,
            "stage_curves": runs[0]["stage_curves"],
            "idle_curves": idle,
        }


def median_calibration(runs: list[dict | None]) -> dict:
    """Each policy's figures over several calibrated runs of one profile (the same group, each
    run its own seeded workload): per figure, the median of the runs' errors (``error``), each
    run's error, and the real figure's lowest and highest (how far the real bench moved between
    runs).  One run's error is too noisy to judge the simulator by: a run of 24 requests is one
    backlog, its first tokens' waits their places in it.  Runs without a calibration are left out."""
    done = [r for r in runs if r]
    out: dict = {}
    for name in dict.fromkeys(p for r in done for p in r):
        figures = [r[name] for r in done if name in r]
        out[name] = {}
        for key in dict.fromkeys(k for f in figures for k in f if k != "model"):
            rows = [f[key] for f in figures if key in f]
            real = [x["real"] for x in rows]
            out[name][key] = {
                "error": statistics.median(x["error"] for x in rows),
                "errors": [x["error"] for x in rows],
                "real_range": (min(real), max(real)),
            }
    return out


def stage_layers(master: Master) -> tuple[int, ...]:
    """Decoder layers each stage serves, in pipeline order (what a stage pauses between)."""
    return tuple(
        s.assignment.layer_end - s.assignment.layer_start for s in master.group.stages if s.assignment is not None
    )


def snapshot(fields: dict) -> CostSnapshot:
    """A :class:`CostSnapshot` from its ``dataclasses.asdict`` (as a report stores it)."""
    typed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return CostSnapshot(**typed)


def cpu_load(real: dict, curves: tuple[tuple[tuple[float, float], ...], ...], costs: CostSnapshot) -> dict:
    """What else used the machine's cores during a real run, as :class:`SimModel` fields: the
    cores kept busy on average by anything but the workers' steps (the master, whatever else ran,
    and the workers' compute for the stages' copies, ``cpu_seconds["copies"]``, which runs beside
    the steps: ``device_busy``), and the CPU seconds a worker spent per step beyond its compute
    as the measured curves price it (receiving, encoding, sending: ``step_overhead``); the
    calibration also passes the other cores as they varied (``other_cores``, every 0.5 s).  From the
    run's CPU accounting (:func:`_cpu_seconds`) and step timelines; nothing when either is
    missing or the stages are not all on this machine's one device."""
    cpu, steps = real.get("cpu_seconds"), [s for s in real.get("steps", ()) if s["computes"] and not s["failed"]]
    if not cpu or not cpu.get("wall") or not steps or len(costs.device_groups()) != 1 or len(curves) != costs.stages:
        return {}
    stage_steps = sum(len(s["computes"]) for s in steps)
    priced = sum(
        curve_seconds(curves[i], s["decodes"] + s["prefill_tokens"] + s["drafts"])
        for s in steps
        for i in range(min(len(s["computes"]), costs.stages))
    )
    copies = cpu.get("copies", 0.0)  # (a report from before the copies has none)
    return {
        "device_busy": (max(0.0, cpu["machine_busy"] - cpu["workers"] + copies) / cpu["wall"],),
        "step_overhead": max(0.0, cpu["workers"] - copies - priced) / stage_steps,
    }


def busy_series(real: dict) -> tuple[tuple[float, float], ...]:
    """The cores kept busy beside the workers' steps as they varied during a real run (sampled
    every ``COST_SAMPLE_SECONDS``): the machine's other work (``other_cores``) and the workers'
    compute for the stages' copies (``copy_cores``; none in a report from before the copies)."""
    copying = dict(real.get("copy_cores", ()))
    return tuple((t, c + copying.get(t, 0.0)) for t, c in real.get("other_cores", ()))


def calibrate(
    costs: CostSnapshot,
    kv_tokens: int,
    workload: list[BenchRequest],
    real: dict[str, dict],
    max_batch_tokens: int,
    layers: tuple[int, ...] = (),
    curves: tuple[tuple[tuple[float, float], ...], ...] = (),
) -> dict:
    """Simulate every policy with the costs measured in the real run, on the same workload, and
    report the simulator's error against the real figures.  The scheduler decides with the
    measured cost line, as the engine did; the stages compute at what their measured ``curves``
    say (the fastest recent step of each size), pause between their ``layers``, and share the
    machine's cores (``costs.devices``) with the other work measured during the run
    (:func:`cpu_load`).  A real run passes as ``curves`` its stages' curves with the longer
    steps' points measured alone (:func:`~app.tools.bench.idle.physics_curves`)."""
    out: dict = {}
    for name, r in real.items():
        model = SimModel(
            costs,
            kv_tokens,
            stage_layers=layers if len(layers) == costs.stages else (),
            stage_curves=curves if len(curves) == costs.stages and all(curves) else (),
            **cpu_load(r, curves, costs),
            plan_costs=tuple((t, snapshot(c)) for t, c in r.get("cost_series", ())),
            device_busy_series=busy_series(r) if len(costs.device_groups()) == 1 else (),
        )
        sim = simulate(model, workload, policy(name, max_batch_tokens))
        out[name] = {
            k: {"real": r[k], "simulated": sim[k], "error": (sim[k] - r[k]) / r[k]}
            for k in ("output_tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")
            if r.get(k)
        }
        out[name]["model"] = {"device_busy": model.device_busy, "step_overhead": model.step_overhead}
    return out


# --------------------------------------------------------------------------- simulation


GPU_CARD_BYTES = 23 * 10**9  # a 24 GB card with 1 GB kept back
GPU_MEMORY_BANDWIDTH = 900e9  # bytes/s of an RTX 3090/4090-class card


def gpu_model(gpus: int, profile: str, direct: bool = False) -> SimModel:
    """Llama-3-70B (80 layers, hidden 8192, fp16 compute and activations) on 24 GB cards: at
    fp16 weights when ``gpus`` cards hold them (8), else at the group precision ``int4``.
    ``direct``: every hop between stages goes straight from card to card, not through the
    master, and the last card feeds decode steps straight back to the first (the loop-back,
    as the engine does where every hop is direct).

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
        loop_back=direct,
    )
    kv_tokens = kv_tokens_on_cards(LLAMA3_70B, gpus, GPU_CARD_BYTES, precision)
    return SimModel(costs, kv_tokens=kv_tokens, stage_layers=(layers,) * gpus)  # pausing as the workers do


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
        from .burst import burst_profile, burst_shape, burst_table

        report["burst"] = []
        for profile in opts.profiles:
            report["burst"].append(await burst_profile(opts, profile, burst_shape(opts)))
        (opts.out / "burst.json").write_text(json.dumps(report, indent=2, default=float))
        print(burst_table(report["burst"]))
        for r in report["burst"]:
            print(f"{r['profile']}: greedy tokens identical across policies: {r['tokens_identical']}")
        print(f"wrote {opts.out / 'burst.json'}")
        return 0
    if opts.chat:
        from .chat import chat_profile, chat_table

        report["chat"] = [await chat_profile(opts, profile) for profile in opts.profiles]
        (opts.out / "chat.json").write_text(json.dumps(report, indent=2, default=float))
        print(chat_table(report["chat"]))
        print(f"wrote {opts.out / 'chat.json'}")
        return 0
    if opts.speculative:
        from .speculative import draft_table, local_copy, speculative_profile, speculative_table

        report["speculative"] = [await speculative_profile(opts, profile) for profile in opts.profiles]
        report["local_copy"] = await local_copy(opts)
        (opts.out / "speculative.json").write_text(json.dumps(report, indent=2, default=float))
        print(speculative_table(report["speculative"], report["local_copy"]))
        if opts.draft_model:
            print(draft_table(report["speculative"]))
        print(f"wrote {opts.out / 'speculative.json'}")
        return 0
    if opts.hops:
        from .hops import hops_profile, hops_table

        report["hops"] = [await hops_profile(opts, profile) for profile in opts.profiles]
        (opts.out / "hops.json").write_text(json.dumps(report, indent=2, default=float))
        print(hops_table(report["hops"]))
        print(f"wrote {opts.out / 'hops.json'}")
        return 0
    if opts.concurrent:
        from .local import concurrent_clients

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
        from .local import single_request

        res = await single_request(opts)
        (opts.out / "single.json").write_text(json.dumps(res, indent=2))
        for r in res["runs"]:
            hf, ours = r["transformers"], r["molink"]
            print(
                f"threads per process {r['threads']}: decode tokens/s, one request: molink {ours['stages']} stages "
                f"{ours['decode_tokens_per_s']:.1f}, transformers one process {hf['decode_tokens_per_s']:.1f} "
                f"(ratio {r['decode_ratio']:.2f}); first token of a {res['long_prompt_tokens']}-token prompt: "
                f"{ours['ttft_long_s']:.2f} s vs {hf['ttft_long_s']:.2f} s ({r['ttft_ratio']:.2f}x)"
            )
            whole, chain = r["one_process_stage"], r["process_chain"]
            print(
                f"  molink's stage code, every layer in one process: {whole['decode_tokens_per_s']:.1f} tok/s "
                f"(ratio {r['one_process_stage_decode_ratio']:.2f}); the layer ranges {ours['layers']} as bare "
                f"processes in a pipe chain: {chain['decode_tokens_per_s']:.1f} tok/s (ratio "
                f"{r['chain_decode_ratio']:.2f}); stage compute per token, ms: chain {chain['stage_compute_ms']}, "
                f"molink {ours['stage_compute_ms']}"
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
        seeds = range(opts.seed, opts.seed + opts.repeats)
        workloads = [make_workload(opts.requests, opts.rate, seed, WorkloadShape()) for seed in seeds]
        report["real"] = []
        for profile in opts.profiles:
            res = await _real_profile(opts, profile, workloads)
            report["real"].append(res)
            rows += [(profile, n, r) for n, r in res["policies"].items()]
            for k, again in enumerate(res["repeats"], 2):
                rows += [(f"{profile} #{k}", n, r) for n, r in again["policies"].items()]
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
        for k, run in enumerate([r, *r["repeats"]], 1):
            for pol, figures in (run["calibration"] or {}).items():
                errs = ", ".join(f"{f} {v['error']:+.0%}" for f, v in figures.items() if f != "model")
                load = figures.get("model", {})
                busy, over = load.get("device_busy") or (0.0,), load.get("step_overhead", 0.0)
                which = f" (run {k}, seed {opts.seed + k - 1})" if r["repeats"] else ""
                print(
                    f"  simulator error vs real, {pol}{which}: {errs} "
                    f"(other cores {busy[0]:.2f}, {over * 1000:.1f} ms a step)"
                )
        if r["repeats"]:
            for pol, figures in r["calibration_median"].items():
                errs = ", ".join(f"{f} {v['error']:+.0%}" for f, v in figures.items())
                print(f"  median error over {len(r['repeats']) + 1} runs, {pol}: {errs}")
    print(f"wrote {opts.out / name} and plots in {opts.out}")
    return 0
