"""How to start an engine process (`molink master|worker|...`) from any frontend.

Contract: ``engine_command(*args)`` is the argv that runs ``molink ARGS`` with the engine:
from a source checkout or an installed package, this interpreter with ``-m app.cli``; from a
frozen app (PyInstaller sets ``sys.frozen``), the engine runtime's interpreter named by
:func:`engine_python` (:func:`app.runtime.build.runtime_python`), never ``sys.executable``,
which is then the frozen app itself.  ``start_local_workers`` and ``stop_processes`` start and
stop the local worker processes of the demo and the benchmark (stopped ones get ``STOP_GRACE``
seconds, then are killed); children get :func:`app.runtime.process.no_window_flags`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from app.runtime.process import no_window_flags

STOP_GRACE = 10.0  # seconds stopped processes get before they are killed


def engine_python() -> str:
    """The interpreter that has the engine (torch, transformers) installed."""
    if getattr(sys, "frozen", False):
        from app.runtime.build import runtime_python  # the per-user engine runtime of an installed app

        return str(runtime_python())
    return sys.executable


def engine_command(*args: str) -> list[str]:
    return [engine_python(), "-m", "app.cli", *args]


def engine_env() -> dict[str, str]:
    """Environment for engine children: unbuffered output (events and logs arrive as written)
    and UTF-8 streams whatever the console code page."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    root = str(Path(__file__).resolve().parents[2])
    if not getattr(sys, "frozen", False):  # a source checkout: the children import our packages from here
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_local_workers(
    address: str, names: list[str], *extra: str, device: str = "cpu", log: Path | None = None
) -> list[subprocess.Popen]:
    """Supervised worker processes on this machine dialling the plain loopback master at
    ``address`` (demo, benchmark, selftest); their output goes to ``log`` (appended) or is
    discarded; ``extra`` are more ``molink worker`` arguments.  Stop them with
    :func:`stop_processes`."""
    procs = []
    for name in names:
        out = open(log, "ab") if log else None  # noqa: SIM115 - the child keeps its own handle
        try:
            procs.append(
                subprocess.Popen(
                    engine_command(
                        "worker", "--master", address, "--device", device, "--name", name, "--supervised", *extra
                    ),
                    stdin=subprocess.PIPE,  # the control channel: closing it asks the worker to stop
                    stdout=out if out is not None else subprocess.DEVNULL,
                    stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                    env=engine_env(),
                    creationflags=no_window_flags(),
                )
            )
        finally:
            if out is not None:
                out.close()
    return procs


def stop_processes(procs: list[subprocess.Popen], grace: float = STOP_GRACE) -> None:
    """Ask ``procs`` to stop through their control channel (stdin closed: EOF means stop, see
    :mod:`worker_core.control`), wait up to ``grace`` seconds in all, then end what is left hard
    (blocking).  No POSIX signal is sent first: Windows has none."""
    for p in procs:
        if p.stdin is not None and not p.stdin.closed:
            with contextlib.suppress(OSError):
                p.stdin.close()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
