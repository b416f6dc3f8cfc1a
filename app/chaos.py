"""`molink chaos`: a local group under random worker faults, measured against a fault-free run.

Contract
--------
``run_chaos(options)`` starts a master (``molink master --supervised``) and ``options.workers``
worker processes on 127.0.0.1, each dialling the master through its own
:class:`~app.tcp_proxy.TcpProxy`, waits (bounded) until every worker holds layers, then runs
one fixed seeded workload twice over the streaming HTTP API, as a client sees it: once
fault-free, once while faults are injected one at a time (``kill``: ``kill -9`` the worker
and start it again at once; ``freeze``: stop it for ``freeze_seconds`` then let it run on;
``cut``: reset its tunnel at the proxy and refuse new connections for ``cut_seconds``).
It prints a table, writes JSON to ``options.out`` and returns 0 (with ``check``: 1 when any
request failed, lost, repeated or changed a token, or a worker kept a cache).  Every wait is bounded; every process and
proxy it started is stopped when it returns, whichever way it returns.

The pieces are public for tests: :class:`LocalGroup` (the processes, proxies and faults),
:func:`run_workload` / :func:`stream_one` (streams as a client sees them), :class:`HealthLog`
(epoch changes seen on ``/health``) and :func:`compare` (one stream against the fault-free one).

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
* rejoined: from the fault to the moment ``/health`` again shows the group serving with every
  worker connected (the restarted, thawed or reconnected worker is back; it takes layers once
  the running requests end, so a returning worker does not make them replay a second time).
* epoch changes per fault: re-plans between the fault and the rejoin (each one
  drops every stage's KV and replays the running requests).
* longest pause: the longest gap between two tokens of one stream.
* caches left on workers: the requests each worker holds a KV cache for once everything
  ended and the group re-formed (every worker holding layers), from each worker's own ``stats``
  event (``kv_requests``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import aiohttp

from .procctl import freeze, kill_hard, thaw
from .tcp_proxy import CutMode, TcpProxy

REPO = Path(__file__).resolve().parent.parent
EVENT_PREFIX = "@molink "  # worker_core.control.EVENT_PREFIX (not imported: no torch in this process's path)
HEALTH_INTERVAL = 0.1  # seconds between /health samples
STOP_TIMEOUT = 20.0  # seconds a child may take to stop after the stop command
EXIT_TIMEOUT = 10.0  # seconds a killed child may take to be reaped
STATS_WAIT = 10.0  # seconds to wait for two fresh stats events from every worker (they come every 2 s)
WORDS = (  # noqa: SIM905 (one readable sentence)
    "the quick brown fox jumps over a lazy dog while seven friends share their graphics cards to serve "
    "one large model across slow home links and every worker dials out to the master that schedules "
    "batches relays activations and streams tokens back to people asking questions about rivers "
    "mountains history music cooking physics gardens and the weather tomorrow morning"
).split()


class FaultKind(Enum):
    KILL = "kill"  # kill -9, then start the worker again at once
    FREEZE = "freeze"  # SIGSTOP for freeze_seconds, then SIGCONT
    CUT = "cut"  # reset the tunnel at the proxy; refuse new connections for cut_seconds


@dataclass(frozen=True)
class ChaosOptions:
    model: str = "default"  # checkpoint folder, hub id, or "default"
    workers: int = 4  # worker processes
    min_workers: int | None = None  # the master serves with this many (None: workers - 1, so one may be lost)
    requests: int = 200  # requests in the workload (run twice)
    concurrency: int = 8  # streams open at once
    seed: int = 0
    faults: tuple[FaultKind, ...] = (FaultKind.KILL, FaultKind.FREEZE, FaultKind.CUT)
    fault_count: int = 6  # faults at most (kinds in a seeded random order, equally often)
    fault_gap: float = 3.0  # seconds the group serves after a rejoin before the next fault
    freeze_seconds: float = 10.0
    cut_seconds: float = 2.0  # new connections refused this long after a cut
    cut_mode: CutMode = CutMode.RST
    prompt_words: tuple[int, int] = (4, 160)  # prompt length range in words (log-uniform)
    max_tokens: tuple[int, int] = (8, 64)  # max_tokens range (log-uniform)
    seeded_share: float = 0.5  # share of requests sampled (temperature 0.8, top_p 0.95, seeded); the rest greedy
    link_delay_ms: float = 0.0  # emulated one-way delay on every worker's tunnel
    threads: int = 1  # torch threads per worker
    memory_limit_gb: float | None = None  # memory each worker offers (None: all free)
    startup_timeout: float = 600.0  # seconds for the group to form
    settle_timeout: float = 180.0  # seconds the group may take to serve with every worker again after a fault
    request_timeout: float = 300.0  # seconds one stream may take; beyond, it counts as hung (failed)
    out: Path = Path("chaos.json")
    log_dir: Path | None = None  # children's stderr (None: a temporary folder, removed)
    check: bool = False  # exit 1 unless every request completed identical to the fault-free run, no cache left

    def validate(self) -> None:
        if self.workers < 2:
            raise ValueError("--workers must be at least 2 (one to lose, one to serve)")
        if not 1 <= self.min_serving <= self.workers:
            raise ValueError("--min-workers must be between 1 and --workers")
        if self.requests < 1 or self.concurrency < 1 or self.fault_count < 0:
            raise ValueError("--requests and --concurrency must be positive, --fault-count not negative")
        for lo, hi in (self.prompt_words, self.max_tokens):
            if not 1 <= lo <= hi:
                raise ValueError(f"bad range {lo},{hi}: need 1 <= low <= high")
        if self.freeze_seconds < 0 or self.cut_seconds < 0 or self.fault_gap < 0:
            raise ValueError("fault durations must not be negative")

    @property
    def min_serving(self) -> int:
        return self.min_workers if self.min_workers is not None else self.workers - 1


def options_from_args(args: argparse.Namespace) -> ChaosOptions:
    """The ``molink chaos`` arguments as options (ValueError: one line for the user)."""

    def pair(text: str, name: str) -> tuple[int, int]:
        try:
            lo, hi = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"--{name} wants LOW,HIGH (two integers), not {text!r}") from None
        return lo, hi

    try:
        kinds = tuple(FaultKind(x) for x in args.faults.split(",") if x)
    except ValueError:
        raise ValueError(f"--faults: known kinds are {', '.join(k.value for k in FaultKind)}") from None
    opts = ChaosOptions(
        model=args.model,
        workers=args.workers,
        min_workers=args.min_workers,
        requests=args.requests,
        concurrency=args.concurrency,
        seed=args.seed,
        faults=kinds,
        fault_count=args.fault_count if kinds else 0,
        fault_gap=args.fault_gap,
        freeze_seconds=args.freeze_seconds,
        cut_seconds=args.cut_seconds,
        cut_mode=CutMode(args.cut_mode),
        prompt_words=pair(args.prompt_words, "prompt-words"),
        max_tokens=pair(args.max_tokens, "max-tokens"),
        link_delay_ms=args.link_delay_ms,
        threads=args.threads,
        memory_limit_gb=args.memory_limit,
        out=Path(args.out),
        log_dir=Path(args.log_dir) if args.log_dir else None,
        check=args.check,
    )
    opts.validate()
    return opts


# --------------------------------------------------------------------------- child processes


class Child:
    """One ``python -m app.cli ... --supervised`` process: ``@molink`` events from stdout (read by
    a thread, timestamped, the last 1000 kept), stderr to a log file, commands on stdin."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self._stderr = open(log, "ab")  # noqa: SIM115 (closed in reap)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args, "--supervised"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.events: deque[tuple[float, dict]] = deque(maxlen=1000)
        self.frozen = False
        threading.Thread(target=self._read, name="molink-chaos-events", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            return
        for raw in stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                with contextlib.suppress(json.JSONDecodeError):
                    self.events.append((time.monotonic(), json.loads(line[len(EVENT_PREFIX) :])))

    async def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for _, e in list(self.events):
                if e.get("event") == name:
                    return e
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited with code {self.proc.returncode} (log: {self.log})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name!r} event from {self.args[0]} within {timeout:.0f} s (log: {self.log})")
            await asyncio.sleep(0.05)

    def command(self, cmd: str) -> None:
        stdin = self.proc.stdin
        with contextlib.suppress(OSError, ValueError):  # gone, or stdin already closed
            if stdin is not None:
                stdin.write(json.dumps({"cmd": cmd}).encode() + b"\n")
                stdin.flush()

    async def kill_hard(self) -> None:
        """kill -9 and reap (bounded)."""
        if self.proc.poll() is None:
            kill_hard(self.pid)
        await self.reap(EXIT_TIMEOUT)

    def freeze(self) -> None:
        freeze(self.pid)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.proc.poll() is None:
            thaw(self.pid)
        self.frozen = False

    async def stop(self) -> None:
        """Graceful stop (command, then EOF); kill -9 after STOP_TIMEOUT."""
        self.thaw()
        if self.proc.poll() is None:
            self.command("stop")
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                kill_hard(self.pid)
        await self.reap(EXIT_TIMEOUT)

    async def reap(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError, subprocess.TimeoutExpired):
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait, timeout), timeout + 1)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        self._stderr.close()


class LocalGroup:
    """A master and N workers on 127.0.0.1, each worker behind its own TCP proxy.

    ``async with LocalGroup(...) as g:`` starts them and waits (bounded) until every worker
    holds layers; leaving stops everything.  Faults: :meth:`kill` (and :meth:`restart`),
    :meth:`freeze`/:meth:`thaw`, :meth:`cut`.  ``health()`` is the master's ``/health``."""

    def __init__(
        self,
        model: str,
        workers: int,
        min_workers: int,
        log_dir: Path,
        *,
        threads: int = 1,
        link_delay_ms: float = 0.0,
        memory_limit_gb: float | None = None,
        startup_timeout: float = 600.0,
    ) -> None:
        self.model = model
        self.n = workers
        self.min_workers = min_workers
        self.log_dir = log_dir
        self.threads = threads
        self.link_delay_ms = link_delay_ms
        self.memory_limit_gb = memory_limit_gb
        self.startup_timeout = startup_timeout
        self.master: Child | None = None
        self.workers: list[Child | None] = [None] * workers
        self.proxies: list[TcpProxy] = []
        self.api = ""
        self.model_id = ""
        self._http: aiohttp.ClientSession | None = None

    @staticmethod
    def name(i: int) -> str:
        return f"chaos-{i}"

    async def __aenter__(self) -> LocalGroup:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await self._start_master(0)
        host, port = self.api.rsplit(":", 1)
        for i in range(self.n):
            proxy = TcpProxy(host, int(port))
            await proxy.start()
            self.proxies.append(proxy)
            self.restart(i)
        await self.wait_whole(self.startup_timeout)

    async def _start_master(self, port: int) -> None:
        args = ["master", "--model", self.model, "--port", str(port), "--min-workers", str(self.min_workers)]
        self.master = Child(args, self.log_dir / "master.log")
        ev = await self.master.wait_event("listening", self.startup_timeout)
        self.api, self.model_id = ev["api"], ev["model"]

    async def restart_master(self) -> None:
        """kill -9 the master and start a new one on the same port (the workers are not told)."""
        if self.master is None:
            raise RuntimeError("the master was never started")
        await self.master.kill_hard()
        await self._start_master(int(self.api.rsplit(":", 1)[1]))

    def restart(self, i: int) -> Child:
        """Start worker ``i`` (again), dialling through its proxy."""
        args = ["worker", "--master", self.proxies[i].address, "--device", "cpu", "--name", self.name(i)]
        args += ["--threads", str(self.threads)]
        if self.link_delay_ms:
            args += ["--link-delay-ms", str(self.link_delay_ms)]
        if self.memory_limit_gb:
            args += ["--memory-limit", str(self.memory_limit_gb)]
        child = Child(args, self.log_dir / f"{self.name(i)}.log")
        self.workers[i] = child
        return child

    def worker(self, i: int) -> Child:
        child = self.workers[i]
        if child is None:
            raise RuntimeError(f"worker {i} was never started")
        return child

    async def kill(self, i: int) -> None:
        await self.worker(i).kill_hard()

    def freeze(self, i: int) -> None:
        self.worker(i).freeze()

    def thaw(self, i: int) -> None:
        self.worker(i).thaw()

    def cut(self, i: int, mode: CutMode = CutMode.RST, refuse: bool = True) -> int:
        """Cut worker ``i``'s tunnel now; with ``refuse``, new connections are reset until :meth:`reconnect`."""
        if refuse:
            self.proxies[i].refuse()
        return self.proxies[i].cut(mode)

    def reconnect(self, i: int) -> None:
        self.proxies[i].accept()

    async def health(self) -> dict | None:
        """The master's /health body (200 or 503), or None when it does not answer."""
        if self._http is None:
            return None
        try:
            async with self._http.get(f"http://{self.api}/health") as r:
                return await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ValueError):
            return None

    @staticmethod
    def whole(h: dict, n: int) -> bool:
        """Serving with ``n`` distinct workers, each holding layers."""
        if h.get("status") != "ok":
            return False
        workers = h.get("workers", [])
        return len(workers) == n and len({w["name"] for w in workers}) == n and all(w["layers"] for w in workers)

    async def wait_rejoined(self, timeout: float) -> dict:
        """Wait (bounded) until the group serves with all ``n`` workers connected (holding layers
        or standing by)."""
        deadline = time.monotonic() + timeout
        while True:
            h = await self.health()
            if h is not None and h.get("status") == "ok" and len({w["name"] for w in h.get("workers", [])}) == self.n:
                return h
            if time.monotonic() > deadline:
                raise TimeoutError(f"the group did not serve with {self.n} workers within {timeout:.0f} s: {h}")
            await asyncio.sleep(0.1)

    async def wait_whole(self, timeout: float) -> dict:
        """Wait (bounded) until every worker holds layers, unchanged for half a second."""
        deadline = time.monotonic() + timeout
        stable_since, epoch = None, None
        while True:
            h = await self.health()
            if h is not None and self.whole(h, self.n):
                if epoch != h["epoch"]:
                    stable_since, epoch = time.monotonic(), h["epoch"]
                elif stable_since is not None and time.monotonic() - stable_since >= 0.5:
                    return h
            else:
                stable_since = epoch = None
            if self.master is not None and self.master.proc.poll() is not None:
                raise RuntimeError(
                    f"the master exited with code {self.master.proc.returncode} (log: {self.master.log})"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the group did not form with {self.n} workers within {timeout:.0f} s: {h}")
            await asyncio.sleep(0.1)

    async def worker_caches(self, timeout: float) -> dict[str, int | None]:
        """Requests each worker holds a KV cache for now: the ``kv_requests`` of its second
        ``stats`` event after this call (one interval later: a pipeline's start-up profile or a
        ``Free`` on its way has settled), None for a worker that sent fewer within ``timeout``."""
        since, deadline = time.monotonic(), time.monotonic() + timeout
        out: dict[str, int | None] = {}
        for i, child in enumerate(self.workers):
            if child is None:
                continue
            fresh: list[dict] = []
            while len(fresh) < 2 and time.monotonic() < deadline:
                fresh = [e for t, e in list(child.events) if t > since and e.get("event") == "stats"]
                if len(fresh) < 2:
                    await asyncio.sleep(0.1)
            out[self.name(i)] = int(fresh[1].get("kv_requests", -1)) if len(fresh) >= 2 else None
        return out

    def master_rss(self) -> int | None:
        """The master process's resident memory in bytes (None if unreadable)."""
        if self.master is None:
            return None
        try:
            import psutil

            return int(psutil.Process(self.master.pid).memory_info().rss)
        except Exception:  # gone, or no permission: no figure rather than a wrong one
            return None

    async def close(self) -> None:
        """Stop every worker and the master (thawed first; bounded), then the proxies."""
        await asyncio.gather(*(w.stop() for w in self.workers if w is not None), return_exceptions=True)
        if self.master is not None:
            await self.master.stop()
        for p in self.proxies:
            await p.close()
        if self._http is not None:
            await self._http.close()
            self._http = None


# --------------------------------------------------------------------------- workload and streams


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    max_tokens: int
    temperature: float  # 0: greedy
    seed: int | None


@dataclass
class StreamRecord:
    index: int
    sent_at: float = 0.0  # seconds (time.monotonic)
    tokens: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival of each token
    finish: str | None = None
    error: str | None = None
    ended_at: float | None = None

    @property
    def completed(self) -> bool:
        return self.finish is not None and self.error is None

    def longest_pause(self) -> float:
        stamps = [self.sent_at, *self.times]
        return max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)


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


class HealthLog:
    """Samples /health every HEALTH_INTERVAL; keeps the changes of (epoch, status, workers with
    layers, names of the connected workers)."""

    def __init__(self, group: LocalGroup) -> None:
        self.group = group
        self.changes: list[tuple[float, int, str, int, frozenset[str]]] = []  # (time, epoch, status, holding, names)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        last = None
        while True:
            h = await self.group.health()
            if h is not None:
                names = frozenset(w["name"] for w in h["workers"])
                now = (h["epoch"], h["status"], sum(1 for w in h["workers"] if w["layers"]), names)
                if now != last:
                    self.changes.append((time.monotonic(), *now))
                    last = now
            await asyncio.sleep(HEALTH_INTERVAL)

    def epoch_at(self, t: float) -> int:
        before = [c for c in self.changes if c[0] <= t]
        return before[-1][1] if before else 0

    def first_epoch_after(self, t: float, epoch: int, until: float) -> float | None:
        return next((c[0] for c in self.changes if t <= c[0] <= until and c[1] > epoch), None)

    def first_noticed(self, t: float, epoch: int, worker: str, until: float) -> float | None:
        """The first sample in ``[t, until]`` showing the master noticed a fault of ``worker``:
        a new epoch, or the worker no longer connected (a worker standing by changes no epoch)."""
        return next((c[0] for c in self.changes if t <= c[0] <= until and (c[1] > epoch or worker not in c[4])), None)

    def epochs_between(self, t0: float, t1: float) -> int:
        return len({c[1] for c in self.changes if t0 <= c[0] <= t1} - {self.epoch_at(t0)})


# --------------------------------------------------------------------------- faults


@dataclass
class FaultRecord:
    kind: str
    worker: str
    at: float  # time.monotonic of the fault
    epoch_before: int
    ended_at: float | None = None  # thawed / reconnected / restarted
    rejoined_at: float | None = None  # serving, every worker connected again
    detect: float | None = None  # seconds
    recover: float | None = None  # seconds; None: no affected stream, or one never recovered
    pause: float | None = None  # seconds: the longest token gap of an affected stream around the fault
    affected: int = 0
    unrecovered: int = 0
    epoch_changes: int = 0
    problem: str | None = None


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
    (so one fault's figures do not include the next fault), and ``fault_gap`` passed.  Stops
    when ``done`` is set."""
    rng = random.Random(opts.seed + 1)
    kinds = [opts.faults[k % len(opts.faults)] for k in range(opts.fault_count)] if opts.faults else []
    rng.shuffle(kinds)
    if await _wait_or_done(done, opts.fault_gap):
        return
    for kind in kinds:
        i = rng.randrange(group.n)
        rec = FaultRecord(kind.value, group.name(i), time.monotonic(), health.epoch_at(time.monotonic()))
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


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Diff:
    identical: bool
    lost: int
    duplicated: int
    wrong: int
    first_divergence: int | None


def compare(reference: list[str], got: list[str]) -> Diff:
    """Align a stream's tokens with the fault-free ones (see the module docstring)."""
    if got == reference:
        return Diff(True, 0, 0, 0, None)
    lost = duplicated = wrong = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, reference, got, autojunk=False).get_opcodes():
        if tag == "delete":
            lost += i2 - i1
        elif tag == "insert":
            if _repeats(got[j1:j2], got[:j1]):
                duplicated += j2 - j1
            else:
                wrong += j2 - j1
        elif tag == "replace":
            lost += i2 - i1
            wrong += j2 - j1
    first = next((k for k, (a, b) in enumerate(zip(reference, got)) if a != b), min(len(reference), len(got)))
    return Diff(False, lost, duplicated, wrong, first)


def _repeats(block: list[str], before: list[str]) -> bool:
    n = len(block)
    return any(before[k : k + n] == block for k in range(len(before) - n + 1))


def percentiles(xs: list[float]) -> dict[str, float | None]:
    """p50, p95 (nearest rank) and max; None for an empty list."""
    s = sorted(xs)
    if not s:
        return {"p50": None, "p95": None, "max": None, "n": 0}

    def rank(p: float) -> float:
        return round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 3)

    return {"p50": rank(50), "p95": rank(95), "max": round(s[-1], 3), "n": len(s)}


def score_faults(faults: list[FaultRecord], streams: list[StreamRecord], health: HealthLog, end: float) -> None:
    for k, f in enumerate(faults):
        until = faults[k + 1].at if k + 1 < len(faults) else end
        seen = health.first_noticed(f.at, f.epoch_before, f.worker, until)
        f.detect = None if seen is None else round(seen - f.at, 3)
        f.epoch_changes = health.epochs_between(f.at, f.rejoined_at or until)
        open_then = [s for s in streams if s.sent_at < f.at and (s.ended_at is None or s.ended_at > f.at)]
        waits, pauses = [], []
        window_end = f.rejoined_at or until
        for s in open_then:
            nxt = next((t for t in s.times if t > f.at), None)
            if nxt is None:
                if s.completed:
                    continue  # every token was out before the fault; only the end was on its way
                f.affected += 1
                f.unrecovered += 1
                continue
            f.affected += 1
            waits.append(nxt - f.at)
            stamps = [s.sent_at, *s.times]
            pauses += [b - a for a, b in zip(stamps, stamps[1:]) if b > f.at and a <= window_end]
        f.recover = round(max(waits), 3) if waits and not f.unrecovered else None
        f.pause = round(max(pauses), 3) if pauses else None


def score_run(reference: list[StreamRecord], run: list[StreamRecord]) -> dict:
    completed = [r for r in run if r.completed]
    totals = {"lost": 0, "duplicated": 0, "wrong": 0, "undelivered": 0}
    differ, details = 0, []
    for ref, got in zip(reference, run):
        if not ref.completed:
            continue  # nothing to compare with
        if got.completed:
            d = compare(ref.tokens, got.tokens)
        else:
            d = compare(ref.tokens[: len(got.tokens)], got.tokens)
            totals["undelivered"] += max(0, len(ref.tokens) - len(got.tokens))
        totals["lost"] += d.lost
        totals["duplicated"] += d.duplicated
        totals["wrong"] += d.wrong
        if not d.identical or not got.completed:
            differ += not d.identical
            details.append(
                {
                    "index": got.index,
                    "completed": got.completed,
                    "error": got.error,
                    "tokens_expected": len(ref.tokens),
                    "tokens_received": len(got.tokens),
                    "identical_prefix": d.identical,
                    "first_divergence": d.first_divergence,
                    "lost": d.lost,
                    "duplicated": d.duplicated,
                    "wrong": d.wrong,
                }
            )
    return {
        "requests": len(run),
        "completed": len(completed),
        "failed": len(run) - len(completed),
        "compared": sum(1 for r in reference if r.completed),
        "streams_differing": differ,
        "tokens_lost": totals["lost"],
        "tokens_duplicated": totals["duplicated"],
        "tokens_wrong": totals["wrong"],
        "tokens_undelivered_by_failed": totals["undelivered"],
        "tokens_received": sum(len(r.tokens) for r in run),
        "errors": sorted({(r.error or "")[:120] for r in run if r.error}),
        "details": details[:50],
    }


def describe_run(run: list[StreamRecord]) -> dict:
    t0 = min(r.sent_at for r in run)
    t1 = max(r.ended_at or r.sent_at for r in run)
    tokens = sum(len(r.tokens) for r in run)
    return {
        "seconds": round(t1 - t0, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(t1 - t0, 1e-9), 2),
        "longest_pause": round(max(r.longest_pause() for r in run), 3),
        "completed": sum(r.completed for r in run),
        "failed": sum(not r.completed for r in run),
    }


_LOG_PATTERNS = {
    "epochs_served": re.compile(r"serving epoch \d+"),
    "steps_failed": re.compile(r"step failed"),
    "requests_failed": re.compile(r"request \d+ failed"),
    "lanes_crashed": re.compile(r"lane \d+ crashed"),
    "workers_left": re.compile(r"worker \S+ left:"),
}


def count_log(path: Path) -> dict[str, int]:
    """How often the master logged each of a few events (its INFO log)."""
    counts = dict.fromkeys(_LOG_PATTERNS, 0)
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        for line in f:
            for name, pattern in _LOG_PATTERNS.items():
                counts[name] += bool(pattern.search(line))
    return counts


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
    clean = clean and all(n == 0 for n in report["caches_left_on_workers"].values())
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
        "definitions": dict(_DEFINITIONS),
        "fault_free_run": describe_run(reference),
        "faulty_run": {**describe_run(faulty), **score_run(reference, faulty)},
        "faults": [_fault_row(f, start) for f in faults],
        "summary": _summary(faults),
        "group_rejoined_at_end": settled,
        "caches_left_on_workers": caches,
        "master_rss_bytes": {"before": rss_before, "after_fault_free_run": rss_middle, "after_faulty_run": rss_after},
        "master_log": count_log(log_dir / "master.log"),
    }


_DEFINITIONS = {
    "detect": "seconds from the fault to the first /health sample with a higher epoch",
    "recover": "seconds from the fault until every stream open at the fault received its next token",
    "rejoined": "seconds from the fault until /health shows the group serving with every worker connected",
    "tokens_lost": "fault-free tokens missing from completed streams (alignment)",
    "tokens_duplicated": "extra tokens in completed streams that repeat the stream's earlier tokens",
    "streams_differing": "requests whose received tokens differ from the fault-free run's",
    "longest_pause": "longest gap between two tokens of one stream (from sending, for the first)",
    "pause": "per fault: the longest token gap of a stream open at the fault, among gaps ending after the fault "
    "and starting before the worker rejoined",
}


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews every figure), where known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


def _fault_row(f: FaultRecord, start: float) -> dict:
    """A fault as JSON: times in seconds, ``at`` from the start of the faulty run, the rest from the fault."""
    row = asdict(f)
    row.update(
        at=round(f.at - start, 3),
        ended_at=None if f.ended_at is None else round(f.ended_at - f.at, 3),
        rejoined_at=None if f.rejoined_at is None else round(f.rejoined_at - f.at, 3),
    )
    return row


def _summary(faults: list[FaultRecord]) -> dict:
    def block(fs: list[FaultRecord]) -> dict:
        return {
            "faults": len(fs),
            "detect": percentiles([f.detect for f in fs if f.detect is not None]),
            "not_detected": sum(f.detect is None for f in fs),
            "recover": percentiles([f.recover for f in fs if f.recover is not None]),
            "pause": percentiles([f.pause for f in fs if f.pause is not None]),
            "not_recovered": sum(f.unrecovered for f in fs),
            "rejoined": percentiles([f.rejoined_at - f.at for f in fs if f.rejoined_at is not None]),
            "epoch_changes": sum(f.epoch_changes for f in fs),
        }

    out = {"all": block(faults)}
    for kind in FaultKind:
        fs = [f for f in faults if f.kind == kind.value]
        if fs:
            out[kind.value] = block(fs)
    return out


def _config(opts: ChaosOptions) -> dict:
    d = asdict(opts)
    d["faults"] = [k.value for k in opts.faults]
    d["cut_mode"] = opts.cut_mode.value
    d["min_workers"] = opts.min_serving
    for k in ("out", "log_dir"):
        d[k] = None if d[k] is None else str(d[k])
    return d


def _fmt(x: float | None, unit: str = " s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def format_table(report: dict) -> str:
    ff, fr = report["fault_free_run"], report["faulty_run"]
    rss, cfg = report["master_rss_bytes"], report["config"]
    mb = lambda b: "-" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [
        f"molink chaos: {report['model']}, {cfg['workers']} workers (serving with >= {cfg['min_workers']}), "
        f"{fr['requests']} requests x 2 runs, {cfg['concurrency']} at once",
        "",
        f"{'':<34}{'fault-free':>14}{'with faults':>14}",
        f"{'requests completed':<34}{ff['completed']:>14}{fr['completed']:>14}",
        f"{'requests failed':<34}{ff['failed']:>14}{fr['failed']:>14}",
        f"{'tokens received':<34}{ff['tokens']:>14}{fr['tokens_received']:>14}",
        f"{'run time':<34}{_fmt(ff['seconds']):>14}{_fmt(fr['seconds']):>14}",
        f"{'longest pause in a stream':<34}{_fmt(ff['longest_pause']):>14}{_fmt(fr['longest_pause']):>14}",
        "",
        f"{'streams differing from fault-free':<34}{fr['streams_differing']:>14}",
        f"{'tokens lost':<34}{fr['tokens_lost']:>14}",
        f"{'tokens duplicated':<34}{fr['tokens_duplicated']:>14}",
        f"{'tokens wrong (other differences)':<34}{fr['tokens_wrong']:>14}",
        "",
        f"{'faults':<8}{'n':>3}{'detect p50/p95/max':>22}{'recover p50/p95/max':>24}{'pause max':>11}"
        f"{'rejoined max':>15}{'epochs':>8}",
    ]
    for name, b in report["summary"].items():
        d, r, f = b["detect"], b["recover"], b["rejoined"]
        det = f"{_fmt(d['p50'], '')}/{_fmt(d['p95'], '')}/{_fmt(d['max'])}"
        rec = f"{_fmt(r['p50'], '')}/{_fmt(r['p95'], '')}/{_fmt(r['max'])}"
        cells = f"{det:>22}{rec:>24}{_fmt(b['pause']['max']):>11}{_fmt(f['max']):>15}{b['epoch_changes']:>8}"
        lines.append(f"{name:<8}{b['faults']:>3}{cells}")
        if b["not_detected"] or b["not_recovered"]:
            lines.append(f"{'':<14}not detected: {b['not_detected']}, streams never recovered: {b['not_recovered']}")
    lines += [
        "",
        f"master RSS: {mb(rss['before'])} before, {mb(rss['after_fault_free_run'])} after the fault-free run, "
        f"{mb(rss['after_faulty_run'])} after the faulty run",
        "caches left on workers (requests with a KV cache, at the end): "
        + ", ".join(
            f"{name} {n if n is not None else 'no report'}" for name, n in report["caches_left_on_workers"].items()
        ),
    ]
    return "\n".join(lines)
