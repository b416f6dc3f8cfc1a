"""Fault tolerance with real processes (issue 14): kill -9, freeze and cut a worker mid-stream.

One group of real `molink master` and `molink worker` processes on 127.0.0.1 (tiny checkpoint,
every worker behind its own TCP proxy: :class:`app.tools.chaos.group.LocalGroup`) runs 8
concurrent streams (4 greedy, 4 seeded) once fault-free, then lives through one fault after
another (freeze, cut, silent path, master restart, kill -9 with a spare, kill without one),
and each faulty run's tokens are compared with the fault-free run's: identical, detected within
3 s, late frames dropped and counted, one re-plan per fault.  Without a spare: running streams
end with an error event and new requests get 503 with Retry-After.  A restarted master is
rejoined by its workers on their own.  Plus the helpers themselves (process control, the
proxy), the KV freed after a client leaves, and `molink chaos` end to end on a small workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from harness import Cluster, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from app.tools.chaos import group as chaos_group
from app.tools.chaos.group import RESTART_NICENESS, Child, HealthLog, LocalGroup
from app.tools.chaos.options import ChaosOptions, FaultKind
from app.tools.chaos.run import Job, inject_faults, run_workload
from app.tools.chaos.score import FaultRecord, StreamRecord, describe_run, score_faults
from app.tools.netlab.procctl import freeze, kill_hard, thaw
from app.tools.netlab.tcp_proxy import CutMode, TcpProxy

pytestmark = pytest.mark.timeout(1500)  # the first test to ask for the story runs every scenario

REPO = Path(__file__).resolve().parent.parent
STARTUP = 180.0  # seconds for a group of fresh processes on a busy 2-core machine
N_TOKENS = 60  # per stream: long enough (with a 20 ms link delay) for a fault to land mid-stream
STREAMS = 8
DETECT_BOUND = 3.0  # seconds: the detection requirement
FREEZE_SECONDS = 10.0
WORDS = shlex.split("layers travel from stage to stage until logits come back over slow home links")
JOBS = [
    Job(i, " ".join(WORDS[: 3 + i]), N_TOKENS, 0.0 if i % 2 == 0 else 0.8, None if i % 2 == 0 else 1000 + i)
    for i in range(STREAMS)
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("chaos") / "llama", num_layers=4, seed=1)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("chaos-logs")


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (bounded) for ``cond``; TimeoutError, not AssertionError: a scenario that cannot be
    set up must be an error, never an expected failure of an ``xfail(raises=AssertionError)``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def health_now(g: LocalGroup) -> dict:
    h = await g.health()
    if h is None:
        raise RuntimeError("the master does not answer /health")
    return h


@dataclass
class Outcome:
    reference: list[StreamRecord]
    faulty: list[StreamRecord]
    tokens_at_fault: list[int]
    detect: float | None  # seconds from the fault to the master's epoch change on /health
    reformed: bool  # every worker holds layers again at the end
    extra: dict = field(default_factory=dict)


async def stage_worker(g: LocalGroup, last: bool = False) -> int:
    """The index of a worker holding layers now (the last stage's with ``last``): a fault on the
    spare would not touch the streams, and after a re-plan any worker may be the spare."""
    workers = [w for w in (await health_now(g))["workers"] if w["stage"] is not None]
    if not workers:
        raise RuntimeError("no worker holds layers")
    pick = max(workers, key=lambda w: w["stage"]) if last else min(workers, key=lambda w: w["stage"])
    return int(pick["name"].rsplit("-", 1)[1])


async def fault_run(
    g: LocalGroup,
    reference: list[StreamRecord],
    fault: Callable[[LocalGroup], Awaitable[None]],
    comes_back: bool = True,
) -> Outcome:
    """The 8 streams again, with ``fault`` applied once every stream has 5 tokens; with
    ``comes_back``, then wait (bounded) for the whole group to hold layers again."""
    health = HealthLog(g)
    health.start()
    live: list[StreamRecord] = []
    task = asyncio.create_task(run_workload(g.api, g.model_id, JOBS, STREAMS, 120, live))
    try:
        await until(lambda: len(live) == STREAMS and all(len(r.tokens) >= 5 for r in live), 60, "5 tokens each")
        epoch, at = (await health_now(g))["epoch"], time.monotonic()
        tokens_at_fault = [len(r.tokens) for r in live]
        await fault(g)
        faulty = await asyncio.wait_for(task, 150)
        streams_ended = time.monotonic()
        reformed = False
        if comes_back:
            with contextlib.suppress(TimeoutError):
                await g.wait_whole(90)
                reformed = True
        async with aiohttp.ClientSession() as http, http.get(f"http://{g.api}/metrics") as r:
            metrics = await r.text()
    finally:
        task.cancel()  # a no-op once it ended
        await asyncio.gather(task, return_exceptions=True)
        await health.stop()
    detect = health.first_epoch_after(at, epoch, time.monotonic())
    return Outcome(
        reference,
        faulty,
        tokens_at_fault,
        None if detect is None else detect - at,
        reformed,
        {
            "metrics": metrics,
            "changes": health.changes,
            "replans_during_streams": health.epochs_between(at, streams_ended),
        },
    )


def assert_identical(o: Outcome) -> None:
    assert all(r.completed for r in o.reference), [r.error for r in o.reference]
    assert all(0 < n < N_TOKENS for n in o.tokens_at_fault), o.tokens_at_fault  # the fault landed mid-stream
    for ref, got in zip(o.reference, o.faulty):
        assert got.completed, f"stream {got.index}: {got.error}"
        assert len(got.tokens) == N_TOKENS, f"stream {got.index}: {len(got.tokens)} tokens"
        assert got.tokens == ref.tokens, f"stream {got.index} differs from the fault-free run"


def transformers_tokens(ckpt: Path, job: Job) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return tok.convert_ids_to_tokens(reference_greedy(ckpt, tok(job.prompt)["input_ids"], job.max_tokens))


# --------------------------------------------------------------------------- helpers under test


def test_the_wait_for_a_standby_copy_ends_at_once_where_the_standby_cannot_hold_the_whole_model(tmp_path):
    """Only a standby member holding the whole model copies the caches: one whose memory does not
    hold it is not waited for (the tool waited the whole settle timeout before each fault); one
    that does is, until its copy caught up."""

    def body(whole: bool, behind: int | None) -> dict:
        copy = None if behind is None else {"member": "chaos-3", "behind": behind, "held": 10}
        workers = [{"stage": 0}, {"stage": None, "whole_model": whole}]
        return {"status": "ok", "workers": workers, "standby_copy": copy}

    async def main() -> tuple[float, dict | None, float, dict | None]:
        g = LocalGroup("m", 2, 1, tmp_path)
        answers = iter([body(False, None)])
        g.health = lambda: asyncio.sleep(0, next(answers))  # type: ignore[method-assign]  # a fake /health
        t0 = time.monotonic()
        none = await g.wait_copied(5.0)
        cold = time.monotonic() - t0
        answers = iter([body(True, None), body(True, 500), body(True, 10)])
        t0 = time.monotonic()
        caught = await g.wait_copied(5.0)
        return cold, none, time.monotonic() - t0, caught

    cold, none, warm, caught = run(main(), 30)
    assert none is None and cold < 1.0, cold
    assert caught is not None and caught["behind"] == 10 and 0.15 < warm < 1.0, warm


# a trivial child for the niceness tests: 3 threads beside its main one, then it says so and sleeps
THREADED = (
    "import threading, time\n"
    "for _ in range(3): threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
    'print(\'@molink {"event": "ready"}\', flush=True)\n'
    "time.sleep(600)\n"
)
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are listed in /proc (Linux)")


def thread_niceness(pid: int) -> list[int]:
    """The niceness of every thread of ``pid``: field 19 of each ``/proc/<pid>/task/<tid>/stat``."""
    out = []
    for stat in sorted(Path(f"/proc/{pid}/task").glob("*/stat")):
        fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: fields 3 on
        out.append(int(fields[19 - 3]))
    return out


def threaded_child(tmp_path: Path, nice: int) -> Child:
    child = Child(["threaded"], tmp_path / f"threaded-{nice}.log", nice=nice, argv=[sys.executable, "-c", THREADED])
    run(child.wait_event("ready", 30), 40)
    return child


@needs_proc
def test_a_restarted_child_runs_every_thread_at_nice_19_until_reniced_and_a_first_start_is_not_niced(tmp_path, capfd):
    own = psutil.Process().nice()
    first, again = threaded_child(tmp_path, 0), threaded_child(tmp_path, RESTART_NICENESS)
    try:
        assert thread_niceness(first.pid) == [own] * 4 and not first.niced  # its main thread and 3 more
        assert thread_niceness(again.pid) == [min(19, own + RESTART_NICENESS)] * 4 and again.niced
        done = again.renice(0)
        said = capfd.readouterr().err
        if os.geteuid() == 0:
            assert done and said == "", said
            assert thread_niceness(again.pid) == [0] * 4
        else:  # lowering a niceness needs root: it says it could not, and carries on
            assert not done and "could not set threaded" in said and "needs root" in said, said
    finally:
        run(first.kill_hard(), 30)
        run(again.kill_hard(), 30)


@needs_proc
def test_a_child_that_may_not_be_reniced_says_so_and_runs_on(tmp_path, capfd, monkeypatch):
    child = threaded_child(tmp_path, RESTART_NICENESS)
    try:

        def refuse(which: int, who: int, prio: int) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(os, "setpriority", refuse)  # as for a user without CAP_SYS_NICE
        assert not child.renice(0)
        said = capfd.readouterr().err
        assert f"could not set threaded (pid {child.pid}) to niceness 0" in said and "needs root" in said, said
        assert thread_niceness(child.pid) == [19] * 4  # untouched, still running
        assert child.proc.poll() is None
    finally:
        run(child.kill_hard(), 30)
    assert not child.renice(0)  # gone: says so, no exception
    assert "could not set threaded" in capfd.readouterr().err


def test_the_group_restarts_a_worker_niced_and_sets_it_back_once_the_group_has_it_again(tmp_path, monkeypatch):
    """First starts are not niced; a start after a kill is, until a wait sees the group with it
    again; then it is set back (once) to the tool's own niceness."""
    made: list[Any] = []

    class FakeChild:
        def __init__(self, args: list[str], log: Path, *, nice: int = 0) -> None:
            self.args, self.nice, self.niced, self.reniced = args, nice, bool(nice), []
            made.append(self)

        def renice(self, niceness: int) -> bool:
            self.reniced.append(niceness)
            return True

    monkeypatch.setattr(chaos_group, "Child", FakeChild)
    g = LocalGroup("m", 2, 1, tmp_path)
    g.proxies = [TcpProxy("127.0.0.1", 1), TcpProxy("127.0.0.1", 2)]  # never started: only their address
    g.restart(0)
    g.restart(1)
    assert [c.nice for c in made] == [0, 0]
    g.restart(1)  # as after a kill
    assert made[2].nice == RESTART_NICENESS and made[2].niced
    both = {"status": "ok", "workers": [{"name": "chaos-0"}, {"name": "chaos-1"}]}
    answers = iter([{"status": "ok", "workers": [{"name": "chaos-0"}]}, both, both])
    g.health = lambda: asyncio.sleep(0, next(answers))  # type: ignore[method-assign]  # a fake /health
    run(g.wait_rejoined(5), 10)
    assert made[2].reniced == [psutil.Process().nice()] and not made[2].niced
    assert made[0].reniced == made[1].reniced == []
    run(g.wait_rejoined(5), 10)
    assert made[2].reniced == [psutil.Process().nice()]  # once


class _FakeGroup:
    """The parts of :class:`LocalGroup` that ``inject_faults`` uses, doing nothing (tests override)."""

    n = 1

    def name(self, i: int) -> str:
        return f"chaos-{i}"

    async def wait_copied(self, timeout: float) -> None:
        return None

    async def serving(self, stage: int) -> int | None:
        return None

    async def kill(self, i: int) -> None:
        pass

    def restart(self, i: int) -> None:
        pass

    def renice_restarted(self) -> None:
        pass

    async def wait_rejoined(self, timeout: float) -> dict:
        return {}


class _FakeHealth:
    def epoch_at(self, t: float) -> int:
        return 1


def test_a_pause_is_split_into_first_token_waits_and_gaps_between_tokens_and_a_faults_pause_says_which():
    """The longest pause of a run is a stream's wait for its first token or a gap once it began
    (a stream stopping); the report gives each, and a fault's pause says which it was."""

    class Health:
        changes: list = []

        def first_noticed(self, *args: Any) -> None:
            return None

        def epochs_between(self, t0: float, t1: float) -> int:
            return 0

    waits = StreamRecord(0, sent_at=10.0, times=[12.5, 12.6, 12.7], finish="length")  # 2.5 s to its first token
    stops = StreamRecord(1, sent_at=10.0, times=[10.2, 10.5, 12.0], finish="length")  # stopped 1.5 s
    r = describe_run([waits, stops])
    assert (r["longest_pause"], r["longest_first_token"], r["longest_gap_between_tokens"]) == (2.5, 2.5, 1.5)
    assert r["first_token"] == {"p50": 0.2, "p95": 2.5, "max": 2.5, "n": 2}
    assert r["longest_gap_between_tokens_at"] == 0.5  # stops' gap began at 10.5, the run at 10.0
    assert describe_run([waits, stops], start=9.0)["longest_gap_between_tokens_at"] == 1.5  # the faults' clock
    assert describe_run([StreamRecord(2, sent_at=1.0, times=[1.5])])["longest_gap_between_tokens_at"] is None
    both, one = FaultRecord("kill", "w0", 11.0, 1), FaultRecord("kill", "w0", 11.0, 1)
    score_faults([both], [waits, stops], Health(), 20.0)  # type: ignore[arg-type]
    assert (both.pause, both.pause_from, both.pause_first_token) == (2.5, -1.0, True)
    score_faults([one], [stops], Health(), 20.0)  # type: ignore[arg-type]
    assert (one.pause, one.pause_from, one.pause_first_token) == (1.5, -0.5, False)


def test_a_killed_workers_restart_is_set_back_once_the_streams_it_stopped_move_again():
    """The restart runs niced only while the repair computes: the tool sets it back as soon as
    every stream open at the kill has a token after it, before waiting for the rejoin (niced
    until the rejoin, under a steady load it hardly ran: 80 s to rejoin, not 5)."""
    calls: list[Any] = []
    killed_at: list[float] = []
    stream = StreamRecord(0, sent_at=time.monotonic() - 1.0, times=[time.monotonic() - 0.5])

    class FakeGroup(_FakeGroup):
        async def kill(self, i: int) -> None:
            killed_at.append(time.monotonic())
            calls.append("kill")

        def restart(self, i: int) -> None:
            calls.append("restart")

        def renice_restarted(self) -> None:
            calls.append(("renice", stream.times[-1] > killed_at[0]))

        async def wait_rejoined(self, timeout: float) -> dict:
            calls.append("rejoined")
            return {}

    async def main() -> None:
        async def stream_moves() -> None:
            while not killed_at:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the repair
            stream.times.append(time.monotonic())
            await asyncio.sleep(0.1)
            stream.ended_at = time.monotonic()

        mover = asyncio.create_task(stream_moves())
        opts = ChaosOptions(faults=(FaultKind.KILL,), fault_count=1, fault_gap=0.0, settle_timeout=5.0)
        out: list = []
        await inject_faults(FakeGroup(), opts, asyncio.Event(), out, _FakeHealth(), [stream])  # type: ignore[arg-type]  # fakes
        await mover
        assert len(out) == 1 and out[0].problem is None, out

    run(main(), 20)
    assert calls == ["kill", "restart", ("renice", True), "rejoined"], calls


def test_a_fault_with_stage_hits_the_worker_serving_that_stage_and_a_bad_stage_is_refused():
    """``--stage N``: each fault goes to the worker /health names as serving stage N; a stage the
    group does not serve with is a clear error."""
    killed: list[int] = []

    class FakeGroup(_FakeGroup):
        n = 4

        async def serving(self, stage: int) -> int | None:
            return {0: 3, 1: 1, 2: 0}.get(stage)

        async def kill(self, i: int) -> None:
            killed.append(i)

    for stage in (0, 2):
        opts = ChaosOptions(faults=(FaultKind.KILL,), fault_count=2, fault_gap=0.0, settle_timeout=1.0, stage=stage)
        run(inject_faults(FakeGroup(), opts, asyncio.Event(), [], _FakeHealth(), []), 20)  # type: ignore[arg-type]  # fakes
    assert killed == [3, 3, 0, 0], killed
    with pytest.raises(ValueError, match="--stage"):
        ChaosOptions(workers=4, stage=3).validate()  # it serves with 3 (one may be lost): stages 0-2


def test_procctl_freezes_thaws_and_kills_a_real_process():
    p = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    try:
        proc = psutil.Process(p.pid)
        freeze(p.pid)
        deadline = time.monotonic() + 10
        while proc.status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, proc.status()
            time.sleep(0.01)
        thaw(p.pid)
        while proc.status() == psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, proc.status()
            time.sleep(0.01)
        kill_hard(p.pid)
        assert p.wait(10) == -9
        with pytest.raises(ProcessLookupError):
            kill_hard(p.pid)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_tcp_proxy_forwards_cuts_refuses_blackholes_and_closes():
    async def main():
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with_data = True
            while with_data:
                data = await reader.read(1024)
                with_data = bool(data)
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = TcpProxy("127.0.0.1", port)
        await proxy.start()
        try:

            async def roundtrip(payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
                r, w = await asyncio.open_connection("127.0.0.1", proxy.listen_port)
                w.write(payload)
                await w.drain()
                return r, w, await asyncio.wait_for(r.readexactly(len(payload)), 5)

            r, w, got = await roundtrip(b"hello")
            assert got == b"hello" and proxy.connections == 1
            assert proxy.cut(CutMode.RST) == 1
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 5)
            w.close()
            proxy.refuse()
            r, w = await asyncio.open_connection("127.0.0.1", proxy.listen_port)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                w.write(b"x")
                await w.drain()
                await asyncio.wait_for(r.readexactly(1), 5)
            w.close()
            assert proxy.refused == 1
            proxy.accept()
            r, w, got = await roundtrip(b"again")
            assert got == b"again"
            assert proxy.blackhole() == 1
            w.write(b"lost")
            await w.drain()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.readexactly(1), 0.5)
            assert proxy.connections == 1  # still open, silently useless
            w.close()
        finally:
            await proxy.close()
            server.close()
            await server.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxy.listen_port)
        return proxy.bytes_up, proxy.bytes_down

    up, down = run(main(), 60)
    assert up == len(b"hello") + len(b"again") and down == up


# --------------------------------------------------------------------------- the faults, on one group
#
# One group of real processes (3 workers, the master serves with 2: a spare) lives through every
# fault in turn, each a scenario that leaves it whole again: a freeze, a cut tunnel, a path gone
# silent, a restarted master; then kill -9 with the spare (the group serves on the other two),
# and last a kill without a spare.  Each faulty run is compared with the one fault-free run.


async def freeze_last_stage(g: LocalGroup) -> None:
    # the last stage: its answers go to the master (an earlier stage's go on over a direct hop,
    # which the new pipeline has closed), so the master has late frames of it to drop and count
    i = await stage_worker(g, last=True)
    g.freeze(i)
    await asyncio.sleep(FREEZE_SECONDS)
    g.thaw(i)


async def cut_a_tunnel(g: LocalGroup) -> None:
    i = await stage_worker(g)
    if g.cut(i) < 1:  # the tunnel (and any other connection of that worker)
        raise RuntimeError("no connection to cut")
    await asyncio.sleep(1.0)  # the link stays down a moment: reconnects are refused
    g.reconnect(i)


async def blackhole_a_path(g: LocalGroup) -> None:
    """The path goes silent with no reset (Wi-Fi gone, a router dropping the flow): bytes are
    dropped both ways while both sockets stay open."""
    if g.proxies[await stage_worker(g)].blackhole() < 1:
        raise RuntimeError("no connection to blackhole")


async def kill_a_stage(g: LocalGroup) -> None:
    await g.kill(await stage_worker(g))


async def restart_the_master(g: LocalGroup) -> dict:
    """kill -9 the master and start it again on the same port: nobody touches the workers; they
    reconnect (capped backoff with jitter), the group re-forms, and a greedy stream gives the
    same tokens as before the restart."""
    (before,) = await run_workload(g.api, g.model_id, JOBS[:1], 1, 60)
    pids = [g.worker(i).pid for i in range(3)]
    await g.restart_master()
    t0 = time.monotonic()
    await g.wait_whole(90)
    rejoined = time.monotonic() - t0
    (after,) = await run_workload(g.api, g.model_id, JOBS[:1], 1, 60)
    return {
        "before": before,
        "after": after,
        "rejoined": rejoined,
        "same_processes": pids == [g.worker(i).pid for i in range(3)],
    }


async def kill_without_a_spare(g: LocalGroup) -> dict:
    """The two workers left are both needed: kill -9 one while 4 greedy streams run; record what
    clients see (new requests: 503; running streams: an error event)."""
    deadline = time.monotonic() + 60
    while not ((h := await g.health()) and h.get("status") == "ok"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the group does not serve on the workers left: {h}")
        await asyncio.sleep(0.1)
    health = HealthLog(g)
    health.start()
    live: list[StreamRecord] = []
    task = asyncio.create_task(run_workload(g.api, g.model_id, JOBS[0:8:2], 4, 120, live))
    try:
        await until(lambda: len(live) == 4 and all(len(r.tokens) >= 5 for r in live), 60, "5 tokens each")
        epoch, at = (await health_now(g))["epoch"], time.monotonic()
        await kill_a_stage(g)
        await until(lambda: health.first_epoch_after(at, epoch, time.monotonic()) is not None, 30, "detection")
        detect = (health.first_epoch_after(at, epoch, time.monotonic()) or at) - at
        body = {"model": g.model_id, "prompt": "a new request", "max_tokens": 4}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
            http.post(f"http://{g.api}/v1/completions", json=body) as r,
        ):
            new = {"status": r.status, "retry_after": r.headers.get("Retry-After"), "body": await r.json()}
        await asyncio.sleep(max(0.0, at + detect + 1.0 - time.monotonic()))
        ended = [(r.ended_at is not None and r.ended_at - at <= detect + 1.0, r.error) for r in live]
        return {"detect": detect, "new_request": new, "ended_in_time": ended}
    finally:
        task.cancel()  # a no-op once they ended
        await asyncio.gather(task, return_exceptions=True)
        await health.stop()


@pytest.fixture(scope="module")
def story(ckpt, logs) -> dict[str, object]:
    """Each scenario's outcome, or the exception it ended with (a scenario after a failed one is
    not run: the group is not known to be whole)."""

    async def main() -> dict[str, object]:
        out: dict[str, object] = {}
        async with LocalGroup(str(ckpt), 3, 2, logs / "story", link_delay_ms=20, startup_timeout=STARTUP) as g:
            reference = await run_workload(g.api, g.model_id, JOBS, STREAMS, 120)
            await g.wait_whole(60)
            scenarios: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("frozen", lambda: fault_run(g, reference, freeze_last_stage)),
                ("cut", lambda: fault_run(g, reference, cut_a_tunnel)),
                ("blackholed", lambda: fault_run(g, reference, blackhole_a_path)),
                ("restart", lambda: restart_the_master(g)),
                ("killed", lambda: fault_run(g, reference, kill_a_stage, comes_back=False)),
                ("no_spare", lambda: kill_without_a_spare(g)),
            ]
            failed = ""
            for name, scenario in scenarios:
                if failed:
                    out[name] = RuntimeError(f"not run: the {failed} scenario failed before it")
                    continue
                try:
                    out[name] = got = await scenario()
                except Exception as e:  # recorded for its tests; the group may be broken: stop here
                    out[name], failed = e, name
                    continue
                if isinstance(got, Outcome) and name != "killed" and not got.reformed:
                    failed = name  # its own tests say so; the next fault would land on a group not whole
        return out

    return run(main(), 1200)


def outcome(story: dict[str, object], name: str) -> Any:
    got = story[name]
    if isinstance(got, BaseException):
        raise RuntimeError(f"the {name} scenario did not run through: {got!r}") from got
    return got


@pytest.fixture(scope="module")
def killed(story) -> Outcome:
    return outcome(story, "killed")


@pytest.fixture(scope="module")
def frozen(story) -> Outcome:
    return outcome(story, "frozen")


@pytest.fixture(scope="module")
def cut(story) -> Outcome:
    return outcome(story, "cut")


@pytest.fixture(scope="module")
def blackholed(story) -> Outcome:
    return outcome(story, "blackholed")


@pytest.fixture(scope="module")
def no_spare(story) -> dict:
    return outcome(story, "no_spare")


def test_kill_9_of_a_worker_mid_stream_with_a_spare_loses_and_repeats_no_token(ckpt, killed):
    assert_identical(killed)
    for job, ref in zip(JOBS, killed.reference):  # the fault-free run itself is right
        if job.temperature == 0:
            assert ref.tokens == transformers_tokens(ckpt, job), f"stream {job.index}"
    assert killed.detect is not None and killed.detect <= DETECT_BOUND, killed.detect


def test_sigstop_10_s_then_sigcont_mid_stream_with_a_spare_loses_and_repeats_no_token(frozen):
    assert_identical(frozen)
    assert frozen.detect is not None, "the frozen worker was never dropped"
    assert frozen.reformed, "the thawed worker did not rejoin"


def test_a_frozen_worker_is_detected_within_3_s(frozen):
    assert frozen.detect is not None and frozen.detect <= DETECT_BOUND, f"detected after {frozen.detect} s"


def test_a_returning_worker_does_not_make_running_streams_replay_again(frozen, cut):
    """The worker comes back while the streams still run: it waits for them to end before the
    pipeline takes it in, so the fault costs one re-plan (one replay), not two."""
    for o in (frozen, cut):
        assert o.extra["replans_during_streams"] == 1, o.extra["changes"]


def test_late_frames_of_a_thawed_worker_are_dropped_and_counted(frozen):
    """The thawed worker's answers to steps of the pipeline it was dropped from (and results of
    that pipeline from the other stages) are dropped: the streams are identical (above), and counted."""
    found = re.search(r"^molink_late_frames_total (\S+)$", frozen.extra["metrics"], re.M)
    assert found, "no late-frame counter"
    assert float(found.group(1)) >= 1, found.group(0)


def test_a_tunnel_cut_at_a_proxy_mid_stream_with_a_spare_loses_and_repeats_no_token(cut):
    assert_identical(cut)
    assert cut.detect is not None and cut.detect <= DETECT_BOUND, cut.detect
    assert cut.reformed, "the cut worker did not reconnect and rejoin"


def test_a_link_gone_silent_mid_stream_with_a_spare_is_detected_within_3_s_and_loses_no_token(blackholed):
    assert_identical(blackholed)
    assert blackholed.detect is not None and blackholed.detect <= DETECT_BOUND, blackholed.detect
    assert blackholed.reformed, "the worker did not notice, reconnect and rejoin"


def test_without_a_spare_a_new_request_gets_a_clean_503(no_spare):
    new = no_spare["new_request"]
    assert no_spare["detect"] <= DETECT_BOUND
    assert new["status"] == 503, new
    assert new["body"]["error"]["type"] == "service_unavailable", new


def test_without_a_spare_running_streams_end_with_an_error_within_detect_plus_1_s(no_spare):
    assert all(ok and err for ok, err in no_spare["ended_in_time"]), no_spare["ended_in_time"]


def test_without_a_spare_the_503_says_when_to_retry(no_spare):
    assert no_spare["new_request"]["retry_after"] == "10"  # MasterConfig.retry_after


def test_workers_rejoin_a_restarted_master_on_their_own(story):
    got = outcome(story, "restart")
    before, after = got["before"], got["after"]
    assert got["same_processes"]  # the same processes, never restarted
    assert before.completed and after.completed, (before.error, after.error)
    assert after.tokens == before.tokens
    assert got["rejoined"] < 90


# --------------------------------------------------------------------------- client disconnect


def _kv_stores() -> list:
    """Every KV store alive in this process, after a collection (an earlier test's in-process
    workers may still be alive, holding their prefix cache's entries: they are not this test's)."""
    from worker_core.kv_cache import KVStore

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, KVStore)]


def _entries(stores: list) -> int:
    """KV caches held in ``stores`` (cheap: no heap walk, so polling it does not stall the
    in-process workers sharing this event loop)."""
    return sum(len(s) for s in stores)


def test_a_client_that_disconnects_mid_stream_or_queued_frees_every_stage_within_2_s(ckpt):
    """In process (the only place a worker's KV is observable today): two stages, one
    request admitted at a time; a client leaves mid-stream, another leaves while queued."""

    async def main() -> tuple[int, float, int, float]:
        opts = [{"link_delay_ms": 20.0} for _ in range(2)]
        # no prefix cache: an ended request's KV would stay on the stages as a cached prefix, on purpose
        cluster = Cluster(ckpt, workers=2, min_workers=2, max_running=1, worker_options=opts, prefix_cache=False)
        old = _kv_stores()  # held (so their ids stay theirs) and left out of every count below
        async with cluster as c:
            old_ids = {id(o) for o in old}
            mine = [s for s in _kv_stores() if id(s) not in old_ids]  # this group's stages
            assert len(mine) == 2, len(mine)
            await until(lambda: _entries(mine) == 0, 10, "no KV before the request (the profile's is freed)")
            body = {
                "model": c.master.model_id,
                "prompt": "one two three",
                "max_tokens": 200,
                "stream": True,
                "ignore_eos": True,
                "temperature": 0,
            }
            async with aiohttp.ClientSession() as http:
                resp = await http.post(f"{c.base_url}/v1/completions", json=body)
                seen = 0
                async for raw in resp.content:
                    seen += raw.startswith(b"data: {")
                    if seen >= 5:
                        break
                queued = await http.post(f"{c.base_url}/v1/completions", json=body)
                await until(lambda: len(c.engine.waiting) == 1, 10, "the second request queued")
                held = _entries(mine)
                queued.close()  # leaves while queued
                t0 = time.monotonic()
                await until(lambda: not c.engine.waiting, 10, "the queued request gone")
                queued_gone = time.monotonic() - t0
                resp.close()  # leaves mid-stream
                t0 = time.monotonic()
                await until(lambda: _entries(mine) == 0 and not c.engine.running, 10, "KV freed on every stage")
                freed = time.monotonic() - t0
            return held, queued_gone, len(c.engine.running), freed

    held, queued_gone, running, freed = run(main(), 180)
    assert held >= 2  # the running request had a cache on both stages (so the check can fail)
    assert queued_gone <= 2.0 and running == 0
    assert freed <= 2.0, f"KV freed after {freed:.2f} s"


# --------------------------------------------------------------------------- molink chaos


def test_molink_chaos_on_a_tiny_model_exits_0_with_sane_json(ckpt, tmp_path):
    out = tmp_path / "chaos.json"
    small = "--workers 3 --requests 16 --concurrency 6 --fault-count 3 --freeze-seconds 3 --cut-seconds 1 "
    small += "--fault-gap 1 --link-delay-ms 10 --prompt-words 4,40 --max-tokens 8,32"
    cmd = [sys.executable, "-m", "app.cli", "chaos", "--model", str(ckpt), *shlex.split(small)]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--out", str(out)]
    p, spawned = _run_watching_children(cmd, tmp_path, 480)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "tokens duplicated" in p.stdout and "detect p50/p95/max" in p.stdout
    assert len(spawned) >= 4, spawned  # the master and 3 workers were seen (so the last check can fail)
    r = json.loads(out.read_text())
    ff, fr = r["fault_free_run"], r["faulty_run"]
    assert ff["completed"] == 16 and ff["failed"] == 0  # the reference run is whole
    for run_ in (ff, fr):
        assert run_["longest_pause"] == max(run_["longest_first_token"], run_["longest_gap_between_tokens"]) > 0
    assert fr["requests"] == 16 and fr["completed"] + fr["failed"] == 16 and fr["compared"] == 16
    for key in ("streams_differing", "tokens_lost", "tokens_duplicated", "tokens_wrong"):
        assert isinstance(fr[key], int) and fr[key] >= 0
    assert 1 <= len(r["faults"]) <= 3
    assert {f["kind"] for f in r["faults"]} <= {"kill", "freeze", "cut"}
    for f in r["faults"]:
        assert f["at"] >= 0 and f["affected"] >= 0 and (f["detect"] is None or f["detect"] >= 0)
    assert set(r["summary"]["all"]["detect"]) == {"p50", "p95", "max", "n"}
    assert r["summary"]["all"]["faults"] == len(r["faults"])
    assert r["caches_left_on_workers"] == {f"chaos-{i}": 0 for i in range(3)}  # nothing leaked, all reported
    assert r["cached_prefixes"] == 0
    rss = r["master_rss_bytes"]
    assert all(isinstance(v, int) and v > 10 * 2**20 for v in rss.values()), rss
    assert r["command"].startswith("molink chaos --model")
    assert len(r["placement"]) == 3 and all(layers for layers in r["placement"].values())
    alive = [c.pid for c in spawned if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive  # every process it started is gone


def _run_watching_children(
    cmd: list[str], folder: Path, timeout: float
) -> tuple[subprocess.CompletedProcess, list[psutil.Process]]:
    """Run ``cmd`` to its end (killed after ``timeout`` s) and note every process it spawned
    meanwhile (its own descendants only: other tests' groups on this machine are not counted)."""
    seen: dict[int, psutil.Process] = {}
    with open(folder / "stdout", "w+") as out, open(folder / "stderr", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{cmd[:4]} did not end in {timeout} s")
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return done, list(seen.values())
