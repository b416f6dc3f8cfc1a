"""An in-process group for tests: a master and N workers on 127.0.0.1, real tunnels.

``async with Cluster(folder, workers=3) as c:`` starts a :class:`master_core.server.Master`
on a free port and N worker tasks (``worker_core.worker.serve``) that dial it over real
WebSockets, waits (bounded) until the pipeline serves, and stops everything on exit.
``run(coro)`` runs a coroutine with an overall time bound; ``paired_config`` is the
configuration of a paired group's master on loopback, ``join_member`` pairs a member with it
and gives its worker's configuration, ``paired_group`` is such a group serving with its
members; ``greedy`` the sampling of a comparison with transformers; ``conversation`` and
``chat`` run a multi-turn conversation whose later turns reuse the cached history.
``output_line(proc, prefix, timeout)`` waits, bounded, for a line of a child process's output
(a thread reads each child's output to its end, so a chatty child never blocks on a full
pipe); ``output_seen(proc)`` is what it printed so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from master_core.config import MasterConfig
from master_core.server import Master
from worker_core.worker import WorkerConfig, serve

T = TypeVar("T")


_OUTPUTS: dict[int, tuple[queue.Queue[str], list[str]]] = {}  # a child's unread lines, and every line read


def output_line(proc: subprocess.Popen, prefix: str, timeout: float, *, at_start: bool = False) -> str:
    """The next line of ``proc``'s output (text, one pipe) holding ``prefix`` (beginning with it
    when ``at_start``), waited for at most ``timeout`` seconds; an AssertionError with the
    output so far otherwise."""
    if proc.pid not in _OUTPUTS:
        lines: queue.Queue[str] = queue.Queue()
        _OUTPUTS[proc.pid] = (lines, [])

        def pump(out=proc.stdout, q=lines) -> None:
            for line in out or ():
                q.put(line)
            q.put("")

        threading.Thread(target=pump, daemon=True).start()
    lines, seen = _OUTPUTS[proc.pid]
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if not line:
            lines.put("")  # the end stays the end for the next call
            break
        seen.append(line)
        if line.startswith(prefix) if at_start else prefix in line:
            return line
    raise AssertionError(f"no {prefix!r} line within {timeout} s; output:\n{output_seen(proc)}")


def output_seen(proc: subprocess.Popen) -> str:
    """Every line :func:`output_line` has read of ``proc``'s output."""
    return "".join(_OUTPUTS[proc.pid][1]) if proc.pid in _OUTPUTS else ""


def run(coro: Awaitable[T], timeout: float = 300.0) -> T:
    """Run ``coro`` for at most ``timeout`` s; past it, print where every task of the loop waits
    (a hang then says what it waited on) and fail with TimeoutError."""

    async def bounded() -> T:
        main = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({main}, timeout=timeout)
        if main in done:
            return main.result()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                print(f"--- {task.get_name()}: {task.get_coro()!r}", file=sys.stderr)
                task.print_stack(limit=12, file=sys.stderr)
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(main, 30)
        raise TimeoutError(f"the test did not end within {timeout} s (every task's stack is printed above)")

    return asyncio.run(bounded())


async def until(done: Callable[[], bool], timeout: float, state: Callable[[], object], poll: float = 0.01) -> None:
    """Wait until ``done()`` (polled every ``poll`` s), at most ``timeout`` s; past it, fail with
    what ``state()`` says (a test's wait that cannot end says where it stood)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not done after {timeout:.0f} s: {state()}")
        await asyncio.sleep(poll)


class Cluster:
    def __init__(
        self, folder: Path | str, workers: int = 3, worker_options: list[dict] | None = None, **master: Any
    ) -> None:
        self.worker_options = worker_options or [{} for _ in range(workers)]
        master.setdefault("min_workers", workers)
        self.config = MasterConfig(model=str(folder), port=0, **master)
        self.n = workers
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Cluster:
        self.master = Master(self.config)
        await self.master.start()
        for i in range(self.n):
            self.add_worker(f"w{i}", **self.worker_options[i])
        if self.n:  # none: the test adds its workers itself
            await self.settled(self.n)
        return self

    async def settled(self, stages: int, timeout: float = 120.0) -> None:
        """Wait until the pipeline serves on ``stages`` stages."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.master.group.serving and len(self.master.group.stages) == stages):
            if loop.time() > deadline:
                raise TimeoutError(f"group not serving on {stages} stages: {self.master.group.problem}")
            await asyncio.sleep(0.02)

    def add_worker(self, name: str, **kw: Any) -> asyncio.Task:
        cfg = WorkerConfig(master=self.master.address, device="cpu", name=name, reconnect=False, **kw)
        t = asyncio.create_task(serve(cfg))
        self.tasks.append(t)
        return t

    @property
    def engine(self):
        return self.master.engine

    @property
    def base_url(self) -> str:
        return f"http://{self.master.address}"

    async def __aexit__(self, *exc: object) -> None:
        await self.master.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def paired_config(folder: Path | str, data_dir: Path, group_port: int = 0, **kw: Any) -> MasterConfig:
    """A paired group's master on loopback: free ports, state in ``data_dir``."""
    return MasterConfig(
        model=str(folder),
        port=0,
        data_dir=str(data_dir),
        group_host="127.0.0.1",
        group_port=group_port,
        **kw,
    )


async def join_member(master: Master, folder: Path, name: str, **kw: Any) -> WorkerConfig:
    """Pair ``name`` (its identity kept in ``folder / name``) with ``master``'s group and return
    the configuration of its worker, as ``molink worker`` builds it after ``molink join``: the
    tunnel pinned to the master, this identity for direct hops (listening on loopback)."""
    from worker_core.identity import client_context, load_or_create
    from worker_core.pairing import join

    port = master.group_port.port
    ident = load_or_create(folder / name / "identity", name)
    joined = await join("127.0.0.1", port, master.new_code(), name, ident.cert_pem)
    return WorkerConfig(
        master=f"127.0.0.1:{port}",
        device="cpu",
        tls=client_context(ident, joined.master_cert),
        identity=ident,
        hop_bind="127.0.0.1",
        weights_dir=folder / name / "weights",
        **kw,
    )


@contextlib.asynccontextmanager
async def paired_group(
    folder: Path | str,
    tmp_path: Path,
    names: tuple[str, ...] = ("alice", "bob"),
    worker: dict[str, Any] | None = None,
    **master: Any,
):
    """A paired group's master on loopback (state in ``tmp_path / "m"``, ``master`` settings added)
    with ``names`` paired and serving (:func:`join_member`, ``worker`` settings added to each),
    yielded once it serves; the workers and the master stopped after."""
    m = Master(paired_config(folder, tmp_path / "m", min_workers=len(names), **master))
    await m.start()
    tasks = []
    try:
        for name in names:
            cfg = await join_member(m, tmp_path, name, reconnect=False, **(worker or {}))
            tasks.append(asyncio.create_task(serve(cfg)))
        await asyncio.wait_for(m.group.wait_serving(), 120)
        yield m
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await m.stop()


def without_copies(monkeypatch: Any) -> None:
    """No stage keeps a copy of another stage's layers (master_core.copies), where a test
    measures one stage's own layers or a repair that such a copy would take over."""
    import master_core.group
    from master_core.copies import NO_COPY

    monkeypatch.setattr(master_core.group, "copy_ends", lambda group, chosen, before: [NO_COPY] * len(chosen))


def greedy(max_tokens: int, **kw: Any):
    from master_core.request import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def conversation(first: list[int], turns: int, seed: int) -> list[list[int]]:
    """New user tokens per turn (the history is prompt + answer of the turn before)."""
    return [first] + [[(seed * 31 + 7 * t + k) % 250 + 3 for k in range(9 + 5 * t)] for t in range(1, turns)]


async def chat(c: Cluster, parts: list[list[int]], new: int = 8) -> list[tuple[list[int], list[int], int]]:
    """Each turn: (its prompt, its answer, prompt tokens reused from the cache)."""
    history: list[int] = []
    out = []
    for part in parts:
        prompt = history + part
        req = c.engine.submit(prompt, greedy(new))
        while not req.finished:
            await asyncio.sleep(0.01)
        assert req.finish_reason == "length", req.finish_reason
        out.append((prompt, list(req.output), req.cached_tokens))
        history = prompt + req.output
    return out
