"""`molink bench --concurrent N` and `--single`: MoLink against one transformers process.

Contract: ``concurrent_clients(opts, n)``: N greedy clients at once through ``opts.workers`` local
stages (one torch thread per process) vs transformers serving the N as one batch, aggregate
tokens/s.  ``single_request(opts)``: one request at a time, decode tokens/s and the first token
of a 500-token prompt, 3 unshaped local stages vs transformers.  Both run in one process run,
side by side.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import TYPE_CHECKING, Any

from app.proc.spawn import start_local_workers, stop_processes
from master_core.config import MasterConfig

from .chain import chain_decode

if TYPE_CHECKING:  # the engine (torch) is imported only when a real run starts
    pass

from .options import BenchOptions

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
    the 3-stage pipeline (unshaped local tunnels) and single-process transformers, side by side
    in one run at two thread settings: torch's default in every process, and one thread per
    process (the issue's comparison: on a 2-core machine three stages with default threads
    contend for the cores).  Each setting also decodes with MoLink's stage code alone
    (:mod:`app.tools.bench.chain`, no serving machinery): every layer in one process, then the same
    layer ranges as MoLink's as bare processes in a pipe chain, the floor of any multi-process
    pipeline on this machine; so the gap splits into the stage code, the cut, and the serving."""
    rng = random.Random(opts.seed)
    short = [rng.randrange(1000, 40000) for _ in range(16)]
    long = [rng.randrange(1000, 40000) for _ in range(long_prompt)]
    runs = [await _single_run(opts, short, long, new_tokens, threads) for threads in (None, 1)]
    return {"new_tokens": new_tokens, "long_prompt_tokens": long_prompt, "runs": runs}


async def _single_run(
    opts: BenchOptions, short: list[int], long: list[int], new_tokens: int, threads: int | None
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from master_core.request import FinishEvent, SamplingParams
    from master_core.server import Master
    from worker_core import model_source

    folder = model_source.resolve(opts.model)

    def hf_run() -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            # Any: transformers types generate()'s self as a protocol its own auto models do not meet
            model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.inference_mode():
                model.generate(torch.tensor([short]), max_new_tokens=4, do_sample=False)  # warm-up
                t0 = time.perf_counter()
                model.generate(torch.tensor([short]), max_new_tokens=1, min_new_tokens=1, do_sample=False)
                one = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.generate(
                    torch.tensor([short]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                )
                total = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.generate(torch.tensor([long]), max_new_tokens=1, do_sample=False)
                ttft = time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)
        decode = (new_tokens - 1) / (total - one)
        return {"decode_tokens_per_s": decode, "ttft_long_s": ttft, "threads": threads or before}

    hf = await asyncio.to_thread(hf_run)
    master = Master(MasterConfig(model=opts.model, port=0, min_workers=opts.workers))
    await master.start()
    extra = ("--threads", str(threads)) if threads else ()
    procs = start_local_workers(master.address, [f"stage-{i}" for i in range(opts.workers)], *extra)
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
        stages = master.group.stages
        computes = [round(1000 * statistics.median(list(s.compute_seconds)[-48:]), 2) for s in stages]
        t0 = time.perf_counter()
        req = master.engine.submit(long, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while not isinstance(await req.events.get(), FinishEvent):
            pass
        ttft = time.perf_counter() - t0
        cuts = [(s.assignment.layer_start, s.assignment.layer_end) for s in stages if s.assignment is not None]
        ours = {
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "ttft_long_s": ttft,
            "stages": len(stages),
            "layers": cuts,
            "stage_compute_ms": computes,  # per decode step, as the workers measured
        }
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)
    # MoLink's stage code in one process over every layer, then cut as MoLink cut it
    whole = await asyncio.to_thread(chain_decode, folder, [(cuts[0][0], cuts[-1][1])], threads or 0, short, new_tokens)
    chain = await asyncio.to_thread(chain_decode, folder, cuts, threads or 0, short, new_tokens)
    return {
        "threads": "default" if threads is None else threads,
        "transformers": hf,
        "molink": ours,
        "one_process_stage": whole,
        "process_chain": chain,
        "decode_ratio": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        "one_process_stage_decode_ratio": whole["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        "chain_decode_ratio": chain["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        "ttft_ratio": ours["ttft_long_s"] / hf["ttft_long_s"],
    }
