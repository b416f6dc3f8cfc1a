"""The shaped local group every real bench runs on, and the report part they share.

Contract: ``shaped_group(opts, profile)`` is an async context manager: a master in this
process and ``opts.workers`` local worker processes whose tunnels are shaped to the link
``profile`` (:data:`~app.tools.bench.options.PROFILES`), serving and profiled; everything is
stopped on exit.  ``profile_report(master, profile, results, identical)`` is the part of a
profile's report every real bench writes (link, per-policy results, token agreement, costs).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from app.proc.spawn import start_local_workers, stop_processes
from master_core.config import MasterConfig

from .options import PROFILES, BenchOptions

if TYPE_CHECKING:  # the engine (torch) is imported only when a real run starts
    from master_core.request import Request
    from master_core.server import Master

TOKEN_TIMEOUT = 300.0  # seconds a bench waits for a request's next event at most


@contextlib.asynccontextmanager
async def shaped_group(opts: BenchOptions, profile: str, draft_model: str = "") -> AsyncIterator[Master]:
    """A master in this process and ``opts.workers`` local worker processes (one torch thread
    each) whose tunnels are shaped to ``profile``, serving, profiled (at most 600 s) and warmed
    up by one short request (the first steps through fresh stages are slow); stopped, workers
    included, whatever happens.  The workers' output is appended to
    ``workers.log`` in ``opts.out``.  ``draft_model``: a folder the master drafts with."""
    from master_core.server import Master

    mbps, rtt = PROFILES[profile]
    cfg = MasterConfig(
        model=opts.model,
        port=0,
        min_workers=opts.workers,
        max_batch_tokens=opts.max_batch_tokens,
        max_running=64,
        draft_model=draft_model,
    )
    master = Master(cfg)
    await master.start()
    shaping = ("--threads", "1", "--link-delay-ms", str(rtt * 1000 / 2), "--link-mbps", str(mbps))
    opts.out.mkdir(parents=True, exist_ok=True)
    log = opts.out / "workers.log"  # what the stages said, for reading after a surprising run
    procs = start_local_workers(master.address, [f"stage-{i}" for i in range(opts.workers)], *shaping, log=log)
    try:
        deadline = time.monotonic() + 600
        master.engine.loop_back = opts.loop_back
        master.engine.speculative = False  # a draft model implies speculation: the benches turn it on themselves
        while not (master.group.serving and master.engine.profiled):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not come up: {master.group.problem}")
            await asyncio.sleep(0.2)
        from master_core.request import SamplingParams

        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        await asyncio.wait_for(master.engine.generate([1000 + 7 * i for i in range(16)], warm), TOKEN_TIMEOUT)
        yield master
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)


async def token_times(req: Request, timeout: float = TOKEN_TIMEOUT) -> list[float]:
    """When each token of ``req`` arrived (``time.perf_counter``), to its end; raises on an error
    end, or when no event comes within ``timeout`` seconds."""
    from master_core.request import FinishEvent

    times: list[float] = []
    while True:
        ev = await asyncio.wait_for(req.events.get(), timeout)
        if isinstance(ev, FinishEvent):
            if ev.reason == "error":
                raise RuntimeError(ev.error)
            return times
        if ev.token_id >= 0:
            times.append(time.perf_counter())


def profile_report(master: Master, profile: str, results: dict, identical: bool) -> dict:
    """The part of a shaped profile's report every real bench shares: the link, each policy's
    results, whether the policies' tokens agree, and the costs the engine measured."""
    mbps, rtt = PROFILES[profile]
    costs = master.engine.costs()
    return {
        "profile": profile,
        "mbps": mbps,
        "rtt_s": rtt,
        "policies": results,
        "tokens_identical": identical,
        "measured_costs": costs.__dict__ if costs else None,
    }
