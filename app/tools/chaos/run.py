"""`molink chaos`: a local group under random worker faults, measured against a fault-free run.

Contract
--------
``run_chaos(options)`` starts a master (``molink master --supervised``) and ``options.workers``
worker processes on 127.0.0.1, each dialling the master through its own
:class:`~app.tools.netlab.tcp_proxy.TcpProxy`, waits (bounded) until every worker holds layers, then runs
one fixed seeded workload twice over the streaming HTTP API, as a client sees it: once
fault-free, once while faults are injected one at a time (``kill``: ``kill -9`` the worker
and start it again at once, at the lowest CPU priority until the streams it stopped move
again, so that on one machine its start does not take the cores the repair needs; ``freeze``: stop it for
``freeze_seconds`` then let it run on;
``cut``: reset its tunnel at the proxy and refuse new connections for ``cut_seconds``).
It prints a table, writes JSON to ``options.out`` and returns 0 (with ``check``: 1 when any
request failed, lost, repeated or changed a token, or a worker kept a cache).  Every wait is bounded; every process and
proxy it started is stopped when it returns, whichever way it returns.

The pieces are public for tests: :class:`~app.tools.chaos.group.LocalGroup` (the processes,
proxies and faults) and :class:`~app.tools.chaos.group.HealthLog` (epoch changes seen on
``/health``) in :mod:`app.tools.chaos.group`; :func:`run_workload` / :func:`stream_one` (streams
as a client sees them) here; :func:`~app.tools.chaos.score.compare` (one stream against the
fault-free one) and the scoring in :mod:`app.tools.chaos.score`; the options and the fault kinds
in :mod:`app.tools.chaos.options`.

Definitions (the same words in the table and the JSON)
------------------------------------------------------
* A stream's tokens are the ``logprobs.tokens`` of its SSE events (``/v1/completions``,
  ``logprobs: 0``, ``ignore_eos``, so every stream has exactly ``max_tokens`` tokens).
* completed: the stream ended with a ``finish_reason``; failed: an HTTP error, an error event,
  a broken connection, or no end within ``request_timeout`` (hung).
* identical: the faulty run's tokens equal the fault-free run's for that request.  Requests
  are compared by an alignment of the two token lists (``difflib``): tokens lost are
  fault-free tokens missing from a completed stream; tokens duplicated are extra tokens that
  repeat the stream's own earlier tokens; tokens wrong are other extra or replaced tokens.  A
  failed stream is only checked to be a prefix of the fault-free one (its missing tail is
  ``tokens_undelivered``, not lost).
* detect: from the fault to the first ``/health`` sample (polled every ``HEALTH_INTERVAL``)
  showing a higher ``epoch`` than before the fault: when the master noticed and re-planned.
* recover: from the fault to the moment every affected stream (sent, not yet ended at the
  fault, with tokens still to come) has received its next token; a stream that never gets one
  (it failed) counts as not recovered.
* pause (per fault): the longest gap between two tokens (or sending and the first token) of
  a stream open at the fault, among the gaps that end after the fault and start before the
  worker rejoined.  A stall can outlast "recover": a token already past the faulty stage
  arrives at once while the others wait for the re-plan and replay.
* copy behind: where a member stands by, the tool waits (at most ``--settle-timeout``) before
  each fault until that member's copy of the open requests' caches (``master_core.shadow``,
  ``/health`` ``standby_copy``) lacks at most ``COPY_CAUGHT_UP`` positions, and records what
  it lacked at the fault.
* rejoined: from the fault to the moment ``/health`` again shows the group serving with every
  worker connected (the restarted, thawed or reconnected worker is back; it takes layers once
  the running requests end, so a returning worker does not make them replay a second time).
* epoch changes per fault: re-plans between the fault and the rejoin (a repair, where a
  member standing by takes the lost stage's range, keeps the other stages' KV and rebuilds
  only that range; any other re-plan drops every stage's KV and replays the running requests).
* longest pause: the longest gap between two tokens of one stream (from its sending, for its
  first token: a long prompt's wait for its first token counts too).
* caches left on workers: the requests each worker holds a KV cache for once everything
  ended and the group re-formed (every worker holding layers), from each worker's own ``stats``
  event (``kv_requests``); beside them, the ended requests' caches the master keeps on every
  stage as cached prefixes (``/health`` ``cached_prefixes``): a worker holding more leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .group import STATS_WAIT, HealthLog, LocalGroup
from .options import ChaosOptions, FaultKind
from .score import (
    DEFINITIONS,
    FaultRecord,
    StreamRecord,
    count_log,
    describe_run,
    fault_row,
    fault_summary,
    format_table,
    score_faults,
    score_run,
)

WORDS = (  # noqa: SIM905 (one readable sentence)
    "the quick brown fox jumps over a lazy dog while seven friends share their graphics cards to serve "
    "one large model across slow home links and every worker dials out to the master that schedules "
    "batches relays activations and streams tokens back to people asking questions about rivers "
    "mountains history music cooking physics gardens and the weather tomorrow morning"
).split()


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    max_tokens: int
    temperature: float  # 0: greedy
    seed: int | None


def make_workload(opts: ChaosOptions) -> list[Job]:
    """The seeded workload: mixed prompt lengths and max_tokens (log-uniform), greedy and seeded."""
    rng = random.Random(opts.seed)

    def log_uniform(lo: int, hi: int) -> int:
        return min(hi, int(lo * (hi / lo) ** rng.random()))

    jobs = []
    for i in range(opts.requests):
        words = " ".join(rng.choice(WORDS) for _ in range(log_uniform(*opts.prompt_words)))
        seeded = rng.random() < opts.seeded_share
        temperature = 0.8 if seeded else 0.0
        jobs.append(
            Job(i, words, log_uniform(*opts.max_tokens), temperature, opts.seed * 100_000 + i if seeded else None)
        )
    return jobs


async def stream_one(
    http: aiohttp.ClientSession, api: str, model_id: str, job: Job, timeout: float, rec: StreamRecord | None = None
) -> StreamRecord:
    """One streamed /v1/completions request, token by token, as a client sees it (into ``rec``
    when given, so a caller can watch the tokens arrive)."""
    rec = rec or StreamRecord(job.index)
    rec.sent_at = time.monotonic()
    body: dict[str, Any] = {
        "model": model_id,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": job.temperature,
        "stream": True,
        "ignore_eos": True,
        "logprobs": 0,
    }
    if job.seed is not None:
        body.update(seed=job.seed, top_p=0.95)

    async def read() -> None:
        async with http.post(f"http://{api}/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    rec.error = f"error event: {str(payload['error'].get('message'))[:200]}"
                    continue
                for choice in payload.get("choices", []):
                    lp = choice.get("logprobs")
                    if lp:
                        now = time.monotonic()
                        for tok in lp.get("tokens", []):
                            rec.tokens.append(tok)
                            rec.times.append(now)
                    if choice.get("finish_reason"):
                        rec.finish = choice["finish_reason"]

    try:
        await asyncio.wait_for(read(), timeout)
        if rec.finish is None and rec.error is None:
            rec.error = "the stream ended without a finish_reason"
    except asyncio.TimeoutError:
        rec.error = f"hung: no end within {timeout:.0f} s"
    except (aiohttp.ClientError, json.JSONDecodeError, ConnectionError) as e:
        rec.error = f"{type(e).__name__}: {str(e)[:200]}"
    rec.ended_at = time.monotonic()
    return rec


async def run_workload(
    api: str, model_id: str, jobs: list[Job], concurrency: int, timeout: float, live: list[StreamRecord] | None = None
) -> list[StreamRecord]:
    """Every job, at most ``concurrency`` streams at once, started in index order.  ``live``
    (when given) receives the records at once, filled while the streams run."""
    records = [StreamRecord(j.index) for j in jobs]
    if live is not None:
        live.extend(records)
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency + 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:

        async def one(job: Job, rec: StreamRecord) -> StreamRecord:
            async with gate:
                return await stream_one(http, api, model_id, job, timeout, rec)

        return list(await asyncio.gather(*(one(j, r) for j, r in zip(jobs, records))))


async def inject_faults(
    group: LocalGroup,
    opts: ChaosOptions,
    done: asyncio.Event,
    out: list[FaultRecord],
    health: HealthLog,
    live: list[StreamRecord],
) -> None:
    """Faults one at a time while the workload (``live``) runs: each on a random worker, then wait
    (bounded) until the group is whole again, every stream open at the fault moved on after that
    (so one fault's figures do not include the next fault), and ``fault_gap`` passed; where a
    member stands by, also until its copy of the caches caught up (bounded; what it still
    lacked is recorded, ``copy_behind``).  Stops when ``done`` is set."""
    rng = random.Random(opts.seed + 1)
    kinds = [opts.faults[k % len(opts.faults)] for k in range(opts.fault_count)] if opts.faults else []
    rng.shuffle(kinds)
    if await _wait_or_done(done, opts.fault_gap):
        return
    for kind in kinds:
        t0 = time.monotonic()
        copy = await group.wait_copied(opts.settle_timeout)
        waited = time.monotonic() - t0
        if done.is_set():
            return
        i = rng.randrange(group.n)  # (drawn either way: the same seed draws the same faults)
        if opts.stage is not None and (serving := await group.serving(opts.stage)) is not None:
            i = serving
        rec = FaultRecord(kind.value, group.name(i), time.monotonic(), health.epoch_at(time.monotonic()))
        rec.copy_behind, rec.copy_wait = (copy or {}).get("behind"), round(waited, 3)
        out.append(rec)
        print(f"  fault {len(out)}: {kind.value} {rec.worker}", flush=True)
        if kind is FaultKind.KILL:
            await group.kill(i)
            group.restart(i)
        elif kind is FaultKind.FREEZE:
            group.freeze(i)
            await asyncio.sleep(opts.freeze_seconds)
            group.thaw(i)
        else:
            group.cut(i, opts.cut_mode)
            await asyncio.sleep(opts.cut_seconds)
            group.reconnect(i)
        rec.ended_at = time.monotonic()
        if kind is FaultKind.KILL:  # its restart ran niced while the repair computed: now it may start
            await _streams_moved(live, rec.at, rec.ended_at, opts.settle_timeout)
            group.renice_restarted()
        try:
            await group.wait_rejoined(opts.settle_timeout)
            rec.rejoined_at = time.monotonic()
        except TimeoutError as e:
            rec.problem = f"the worker did not rejoin: {e}"
            print(f"  {rec.problem}", flush=True)
            return
        if not await _streams_moved(live, rec.at, rec.rejoined_at, opts.settle_timeout):
            rec.problem = f"streams open at the fault did not move within {opts.settle_timeout:.0f} s of the rejoin"
            print(f"  {rec.problem}", flush=True)
            return
        if await _wait_or_done(done, opts.fault_gap):
            return


async def _streams_moved(live: list[StreamRecord], at: float, since: float, timeout: float) -> bool:
    """Wait (bounded) until every stream open at ``at`` has ended or received a token after ``since``."""
    open_then = [r for r in live if 0 < r.sent_at < at and (r.ended_at is None or r.ended_at > at)]
    deadline = time.monotonic() + timeout
    while not all(r.ended_at is not None or (r.times and r.times[-1] > since) for r in open_then):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _wait_or_done(done: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(done.wait(), seconds)
    return done.is_set()


# --------------------------------------------------------------------------- the tool


async def run_chaos(opts: ChaosOptions) -> int:
    opts.validate()
    with contextlib.ExitStack() as stack:
        log_dir = opts.log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="molink-chaos-")))
        try:
            report = await _measure(opts, log_dir)
        except (RuntimeError, TimeoutError) as e:  # the group broke beyond measuring: one line
            print(f"molink chaos: {e}", file=sys.stderr)
            return 1
    if report is None:
        return 1
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {opts.out}")
    s = report["faulty_run"]
    clean = s["failed"] == 0 and s["streams_differing"] == 0 and s["tokens_lost"] == 0 and s["tokens_duplicated"] == 0
    clean = clean and all(
        n is not None and n <= report["cached_prefixes"] for n in report["caches_left_on_workers"].values()
    )
    return 0 if clean or not opts.check else 1


async def _measure(opts: ChaosOptions, log_dir: Path) -> dict | None:
    jobs = make_workload(opts)
    print(f"starting a master and {opts.workers} workers ({opts.model}; logs in {log_dir})...", flush=True)
    group = LocalGroup(
        opts.model,
        opts.workers,
        opts.min_serving,
        log_dir,
        threads=opts.threads,
        link_delay_ms=opts.link_delay_ms,
        memory_limit_gb=opts.memory_limit_gb,
        startup_timeout=opts.startup_timeout,
    )
    health = HealthLog(group)
    faults: list[FaultRecord] = []
    load_start = _load_average()
    try:
        try:
            await group.start()
        except (RuntimeError, TimeoutError) as e:
            print(f"molink chaos: {e}", file=sys.stderr)
            return None
        h = await group.wait_whole(opts.settle_timeout)
        layers = {w["name"]: w["layers"] for w in h["workers"]}
        rss_before = group.master_rss()
        health.start()
        print(f"fault-free run: {len(jobs)} requests, {opts.concurrency} at once...", flush=True)
        reference = await run_workload(group.api, group.model_id, jobs, opts.concurrency, opts.request_timeout)
        rss_middle = group.master_rss()
        await group.wait_whole(opts.settle_timeout)
        print(f"faulty run: the same requests, up to {opts.fault_count} faults...", flush=True)
        start = time.monotonic()
        done = asyncio.Event()
        live: list[StreamRecord] = []
        injector = asyncio.create_task(inject_faults(group, opts, done, faults, health, live))
        try:
            faulty = await run_workload(group.api, group.model_id, jobs, opts.concurrency, opts.request_timeout, live)
        finally:
            done.set()
            bound = opts.freeze_seconds + opts.cut_seconds + 2 * opts.settle_timeout + opts.fault_gap + 30
            try:
                await asyncio.wait_for(injector, bound)
            except asyncio.TimeoutError:
                print("molink chaos: the fault injector did not finish in time", file=sys.stderr)
        end = time.monotonic()
        try:
            await group.wait_whole(opts.settle_timeout)
            settled = True
        except TimeoutError:
            settled = False
        rss_after = group.master_rss()
        caches = await group.worker_caches(STATS_WAIT)
        prefixes = int((await group.health() or {}).get("cached_prefixes", 0))
    finally:
        await health.stop()
        await group.close()
    score_faults(faults, faulty, health, end)
    return {
        "command": shlex.join(["molink", *sys.argv[1:]]),
        "config": _config(opts),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": load_start,
            "load_average_at_end": _load_average(),
        },
        "model": group.model_id,
        "placement": layers,
        "definitions": dict(DEFINITIONS),
        "fault_free_run": describe_run(reference),
        "faulty_run": {**describe_run(faulty, start), **score_run(reference, faulty)},
        "faults": [fault_row(f, start) for f in faults],
        "summary": fault_summary(faults),
        "group_rejoined_at_end": settled,
        "caches_left_on_workers": caches,
        "cached_prefixes": prefixes,
        "master_rss_bytes": {"before": rss_before, "after_fault_free_run": rss_middle, "after_faulty_run": rss_after},
        "master_log": count_log(log_dir / "master.log"),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews every figure), where known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


def _config(opts: ChaosOptions) -> dict:
    d = asdict(opts)
    d["faults"] = [k.value for k in opts.faults]
    d["cut_mode"] = opts.cut_mode.value
    d["min_workers"] = opts.min_serving
    for k in ("out", "log_dir"):
        d[k] = None if d[k] is None else str(d[k])
    return d
