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
    from master_core.server import Master


@contextlib.asynccontextmanager
async def shaped_group(opts: BenchOptions, profile: str) -> AsyncIterator[Master]:
    """A master in this process and ``opts.workers`` local worker processes (one torch thread
    each) whose tunnels are shaped to ``profile``, serving and profiled (at most 600 s);
    stopped, workers included, whatever happens.  The workers' output is appended to
    ``workers.log`` in ``opts.out``."""
    from master_core.server import Master

    mbps, rtt = PROFILES[profile]
    cfg = MasterConfig(
        model=opts.model, port=0, min_workers=opts.workers, max_batch_tokens=opts.max_batch_tokens, max_running=64
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
        while not (master.group.serving and master.engine.profiled):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not come up: {master.group.problem}")
            await asyncio.sleep(0.2)
        yield master
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)


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
