"""The processes of `molink chaos`: a local group whose workers can be killed, frozen or cut off.

Contract: :class:`LocalGroup` starts a master (``molink master --supervised``) and N workers on
127.0.0.1, each dialling the master through its own
:class:`~app.tools.netlab.tcp_proxy.TcpProxy`, waits (bounded) until every worker holds layers,
injects the faults of :class:`~app.tools.chaos.options.FaultKind` on request and stops every
process and proxy on exit.  A worker started again (after a ``kill``) runs under
``nice -n RESTART_NICENESS`` until :meth:`LocalGroup.renice_restarted` (the fault's streams moved
on again, or a wait sees the group whole or rejoined), then every thread of it is set back to
this tool's own niceness (:meth:`Child.renice`).  :class:`Child` is one
supervised child process and its event stream; :class:`HealthLog` samples the master's
``/health`` to tell when a fault was noticed and the group re-formed.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import aiohttp

from app.tools.netlab.procctl import freeze, kill_hard, thaw
from app.tools.netlab.tcp_proxy import CutMode, TcpProxy

REPO = Path(__file__).resolve().parents[3]
EVENT_PREFIX = "@molink "  # worker_core.control.EVENT_PREFIX (not imported: no torch in this process's path)
HEALTH_INTERVAL = 0.1  # seconds between /health samples
# a standby's copy of the caches counts as caught up lacking at most this many positions: one of its
# steps (master_core.shadow.STEP_TOKENS); the streams add positions while it computes one
COPY_CAUGHT_UP = 64
STOP_TIMEOUT = 20.0  # seconds a child may take to stop after the stop command
EXIT_TIMEOUT = 10.0  # seconds a killed child may take to be reaped
STATS_WAIT = 10.0  # seconds to wait for two fresh stats events from every worker (they come every 2 s)
# A killed worker's restart stands for its own machine coming back, but here it shares the cores of
# the members that survive: its imports and model load took the CPU they needed for the repair (a
# kill's pause measured 4.65 s instead of about 1.4 s).  So it restarts at once, at the lowest CPU
# priority, and is set back once the streams the kill stopped move again (the repair is done):
# niced for longer, under a steady load it hardly ran (it rejoined after 80 s, not 5).  A first
# start is not niced.
RESTART_NICENESS = 19
RENICE_PASSES = 5  # listings of a process's threads while renicing: a thread started meanwhile is caught


# --------------------------------------------------------------------------- child processes


class Child:
    """One ``python -m app.cli ... --supervised`` process: ``@molink`` events from stdout (read by
    a thread, timestamped, the last 1000 kept), stderr to a log file, commands on stdin."""

    def __init__(self, args: list[str], log: Path, *, nice: int = 0, argv: list[str] | None = None) -> None:
        """``nice``: start under ``nice -n NICE`` (every thread inherits it; 0: not niced).
        ``argv``: run this command line instead of ``python -m app.cli ARGS --supervised`` (tests)."""
        self.args = args
        self.log = log
        command = argv or [sys.executable, "-m", "app.cli", *args, "--supervised"]
        # POSIX `nice` only: Windows has none, and there the child runs at normal priority, as it always did
        self.niced = bool(nice) and os.name == "posix"  # started niced and not yet set back (LocalGroup)
        if self.niced:
            command = ["nice", "-n", str(nice), *command]  # nice execs the command: the pid is the child's
        self._stderr = open(log, "ab")  # noqa: SIM115 (closed in reap)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.proc = subprocess.Popen(
            command,
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

    def renice(self, niceness: int) -> bool:
        """Set every thread of the process (each one in ``/proc/<pid>/task/``) to ``niceness``.

        The threads are listed again until a listing shows none not yet set (at most
        ``RENICE_PASSES`` listings), so a thread started meanwhile is caught; one that ended
        meanwhile is skipped.  True when done; False, with one line on stderr saying it could not
        and why, when the process is gone, there is no ``/proc`` (not Linux), or the operating
        system refused (lowering a niceness needs root or ``CAP_SYS_NICE``).  Never raises."""
        done: set[int] = set()
        try:
            for _ in range(RENICE_PASSES):
                tids = {int(t) for t in os.listdir(f"/proc/{self.pid}/task")} - done
                if not tids:
                    break
                for tid in sorted(tids):
                    with contextlib.suppress(ProcessLookupError):  # that thread ended meanwhile
                        os.setpriority(os.PRIO_PROCESS, tid, niceness)
                    done.add(tid)
        except OSError as e:
            why = " (lowering a niceness needs root or CAP_SYS_NICE)" if isinstance(e, PermissionError) else ""
            print(
                f"molink chaos: could not set {self.args[0]} (pid {self.pid}) to niceness {niceness}: {e}{why}",
                file=sys.stderr,
                flush=True,
            )
            return False
        return True

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

    async def serving(self, stage: int) -> int | None:
        """The index of the worker serving ``stage`` now (/health), or None."""
        h = await self.health() or {}
        names = [w.get("name") for w in h.get("workers", []) if w.get("stage") == stage]
        return next((i for i in range(self.n) if [self.name(i)] == names), None)

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
        """Start worker ``i``, dialling through its proxy; started again (it was started before),
        under ``nice -n RESTART_NICENESS`` until :meth:`renice_restarted`."""
        args = ["worker", "--master", self.proxies[i].address, "--device", "cpu", "--name", self.name(i)]
        args += ["--threads", str(self.threads)]
        if self.link_delay_ms:
            args += ["--link-delay-ms", str(self.link_delay_ms)]
        if self.memory_limit_gb:
            args += ["--memory-limit", str(self.memory_limit_gb)]
        again = self.workers[i] is not None
        child = Child(args, self.log_dir / f"{self.name(i)}.log", nice=RESTART_NICENESS if again else 0)
        self.workers[i] = child
        return child

    def renice_restarted(self) -> None:
        """Every worker still niced since its restart back at this tool's own niceness (0 unless
        the tool itself was niced), every thread of it; one try each (a refusal is said once)."""
        niced = [c for c in self.workers if c is not None and c.niced]
        own = os.getpriority(os.PRIO_PROCESS, 0) if niced else 0  # niced: POSIX
        for child in niced:
            child.niced = False
            child.renice(own)

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
        or standing by); then a worker restarted under nice is set back (:meth:`Child.renice`)."""
        deadline = time.monotonic() + timeout
        while True:
            h = await self.health()
            if h is not None and h.get("status") == "ok" and len({w["name"] for w in h.get("workers", [])}) == self.n:
                self.renice_restarted()
                return h
            if time.monotonic() > deadline:
                raise TimeoutError(f"the group did not serve with {self.n} workers within {timeout:.0f} s: {h}")
            await asyncio.sleep(0.1)

    async def wait_copied(self, timeout: float) -> dict | None:
        """Wait (bounded) until no member stands by with the whole model (one whose memory does
        not hold it copies nothing), or the master's ``standby_copy`` (a standby member's copy
        of the open requests' caches) lacks at most ``COPY_CAUGHT_UP`` positions, and so does
        each copy a stage keeps of another's layers (``stage_copies``); returns the standby's copy's
        last state, or else the stage copies' (``behind``: the most one lacks; None: nobody copies)."""
        deadline = time.monotonic() + timeout
        while True:
            h = await self.health() or {}
            copy = h.get("standby_copy")
            stages = h.get("stage_copies") or {}
            if copy is None and stages:
                copy = {"behind": max(stages.values()), "stages": stages}
            standing = [w for w in h.get("workers", []) if w.get("stage") is None and w.get("whole_model")]
            caught = max(stages.values(), default=0) <= COPY_CAUGHT_UP
            if (
                h.get("status") == "ok"
                and caught
                and (not standing or (copy is not None and copy["behind"] <= COPY_CAUGHT_UP))
            ):
                return copy
            if time.monotonic() > deadline:
                return copy
            await asyncio.sleep(0.1)

    async def wait_whole(self, timeout: float) -> dict:
        """Wait (bounded) until every worker holds layers, unchanged for half a second; then a
        worker restarted under nice is set back (:meth:`Child.renice`)."""
        deadline = time.monotonic() + timeout
        stable_since, epoch = None, None
        while True:
            h = await self.health()
            if h is not None and self.whole(h, self.n):
                if epoch != h["epoch"]:
                    stable_since, epoch = time.monotonic(), h["epoch"]
                elif stable_since is not None and time.monotonic() - stable_since >= 0.5:
                    self.renice_restarted()
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
