"""One supervised engine child process: start, control channel, events, logs, backoff restarts.

Contract
--------
``Supervisor(name, argv, log_path)`` runs ``argv`` (a ``molink ... --supervised`` command,
see :mod:`worker_core.control` for the protocol) with :class:`QProcess`:

* ``start()`` starts it (no console window on Windows; explicit pipes for all three streams).
* Each stdout line ``@molink {json}`` is parsed and emitted as ``engine_event(dict)``; every other
  line of stdout and stderr goes to the log file and to the ring of ``last_lines()``.  Event
  lines never reach the log (they may carry the master's admin token).
* ``send(cmd)`` writes ``{"cmd": cmd}`` to the child's stdin.
* ``stop(cmd="stop", grace)`` asks through the control channel, closes stdin (EOF also means
  stop) and hard-kills after ``grace`` seconds if the child is still running.  No POSIX signal
  is ever used (Windows has none).
* An exit nobody asked for is a crash: ``crashed(code, last_lines)`` is emitted and, with
  ``restart=True``, the child is started again after a backoff doubling from
  ``BACKOFF_FIRST`` to ``BACKOFF_MAX`` seconds (reset after ``STABLE_AFTER`` seconds of running).
* ``stopped(code)`` is emitted when a child that was asked to stop has exited.
* On Windows each child is put in a kill-on-close Job Object (:mod:`app.desktop.system._windows_job`), so it
  cannot outlive a tray that crashed; elsewhere the closed stdin of a dead parent stops it.

Qt objects only; everything happens on the Qt event loop, nothing blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections import deque
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

from app.proc.spawn import engine_env
from app.runtime.process import no_window_flags

if TYPE_CHECKING:
    from .system._windows_job import ChildJob

log = logging.getLogger("molink.app.supervisor")

EVENT_PREFIX = "@molink "
BACKOFF_FIRST = 2.0  # seconds before the first restart after a crash
BACKOFF_MAX = 60.0  # seconds; the longest wait between restarts
STABLE_AFTER = 60.0  # seconds of running that reset the backoff
LAST_LINES = 200  # log lines kept for the error view
LOG_ROTATE_BYTES = 5 * 1024 * 1024  # a log above this moves to NAME.1 (at start and while writing): <= 2x on disk


_job: ChildJob | Literal[False] | None = None  # the Windows job object of this process's children, made on first use


def _add_to_job(pid: int) -> None:
    global _job
    if sys.platform != "win32":
        return
    if _job is None:
        from .system._windows_job import child_job

        _job = child_job() or False
    if _job:
        _job.add(pid)


class ChildState(Enum):
    IDLE = "idle"  # never started, or stopped on request
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop; a hard stop follows after the grace period
    WAITING = "waiting"  # crashed; a restart is scheduled


_ALLOWED: dict[ChildState, frozenset[ChildState]] = {
    ChildState.IDLE: frozenset({ChildState.RUNNING}),
    ChildState.RUNNING: frozenset({ChildState.STOPPING, ChildState.WAITING, ChildState.IDLE}),
    ChildState.STOPPING: frozenset({ChildState.IDLE}),
    ChildState.WAITING: frozenset({ChildState.RUNNING, ChildState.IDLE}),
}


class Supervisor(QObject):
    engine_event = Signal(dict)  # one parsed @molink event line
    crashed = Signal(int, list)  # exit code, last lines
    stopped = Signal(int)  # exit code of a child that was asked to stop
    started = Signal()

    def __init__(
        self, name: str, argv: list[str], log_path: Path, restart: bool = True, parent: QObject | None = None
    ) -> None:
        super().__init__(parent)
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.restart = restart
        self.state = ChildState.IDLE
        self._proc: QProcess | None = None
        self._spent: QProcess | None = None  # the last exited process (see _finished)
        self._lines: deque[str] = deque(maxlen=LAST_LINES)
        self._partial = {QProcess.ProcessChannel.StandardOutput: b"", QProcess.ProcessChannel.StandardError: b""}
        self._backoff = BACKOFF_FIRST
        self._started_at = 0.0
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.timeout.connect(self._hard_stop)
        self._restart_timer = QTimer(self)
        self._restart_timer.setSingleShot(True)
        self._restart_timer.timeout.connect(self._start_process)
        self._log_file = None

    def _move(self, to: ChildState) -> None:
        """The only place the state changes; a move ``_ALLOWED`` does not list is a bug."""
        if to not in _ALLOWED[self.state]:
            raise RuntimeError(f"{self.name}: supervisor cannot go from {self.state.value} to {to.value}")
        self.state = to

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self.state in (ChildState.RUNNING, ChildState.STOPPING):
            return
        self._restart_timer.stop()
        self._backoff = BACKOFF_FIRST
        self._start_process()

    def running(self) -> bool:
        return self.state in (ChildState.RUNNING, ChildState.STOPPING)

    def pid(self) -> int | None:
        return int(self._proc.processId()) if self._proc is not None and self.running() else None

    def send(self, cmd: str) -> bool:
        if self._proc is None or self._proc.state() != QProcess.ProcessState.Running:
            return False
        self._proc.write((json.dumps({"cmd": cmd}) + "\n").encode())
        return True

    def stop(self, cmd: str = "stop", grace: float = 30.0) -> None:
        """Ask the child to stop (``cmd`` through the control channel, then EOF); hard stop
        after ``grace`` seconds.  A scheduled restart is cancelled."""
        self._restart_timer.stop()
        if self.state is ChildState.WAITING:
            self._move(ChildState.IDLE)
            self.stopped.emit(0)
            return
        if self._proc is None or self.state is not ChildState.RUNNING:
            return
        self._move(ChildState.STOPPING)
        self.send(cmd)
        if cmd == "stop":
            self._proc.closeWriteChannel()  # EOF: stop even if the line was not read
        self._kill_timer.start(int(grace * 1000))

    def last_lines(self, n: int = 20) -> list[str]:
        return list(self._lines)[-n:]

    # ------------------------------------------------------------------ process
    def _start_process(self) -> None:
        if self._spent is not None:
            self._spent.deleteLater()
            self._spent = None
        self._open_log()
        proc = QProcess(self)
        env = QProcessEnvironment()
        for k, v in engine_env().items():
            env.insert(k, v)
        proc.setProcessEnvironment(env)
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.SeparateChannels)
        flags = no_window_flags()
        if flags:  # Windows: no console window flashing up for the engine

            def modifier(args, flags=flags):  # noqa: ANN001 - QProcess.CreateProcessArguments
                args.flags |= flags

            # Windows-only Qt API: the PySide6 stubs pyright reads (made on Linux) lack it, so it stays unchecked
            proc.setCreateProcessArgumentsModifier(modifier)  # type: ignore[attr-defined]
        proc.readyReadStandardOutput.connect(lambda: self._read(QProcess.ProcessChannel.StandardOutput))
        proc.readyReadStandardError.connect(lambda: self._read(QProcess.ProcessChannel.StandardError))
        proc.started.connect(lambda: _add_to_job(int(proc.processId())))
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._error)
        self._proc = proc
        self._move(ChildState.RUNNING)
        self._started_at = time.monotonic()
        self._write_log(f"--- starting {self.name}: {' '.join(self.argv[1:])}")
        proc.start(self.argv[0], self.argv[1:])
        self.started.emit()

    def _error(self, error: QProcess.ProcessError) -> None:
        if error is QProcess.ProcessError.FailedToStart and self._proc is not None:
            self._write_log(f"--- cannot start {self.argv[0]}: {self._proc.errorString()}")
            self._finished(-1, QProcess.ExitStatus.CrashExit)

    def _read(self, channel: QProcess.ProcessChannel) -> None:
        if self._proc is None:
            return
        self._proc.setReadChannel(channel)
        data = self._partial[channel] + bytes(self._proc.readAll().data())
        *lines, rest = data.split(b"\n")
        self._partial[channel] = rest[-65536:]  # a line without end is kept, bounded
        for raw in lines:
            self._line(raw.decode("utf-8", "replace").rstrip("\r"), channel is QProcess.ProcessChannel.StandardOutput)

    def _line(self, text: str, stdout: bool) -> None:
        if stdout and text.startswith(EVENT_PREFIX):
            try:
                ev = json.loads(text[len(EVENT_PREFIX) :])
            except ValueError:
                ev = None
            if isinstance(ev, dict) and isinstance(ev.get("event"), str):
                self.engine_event.emit(ev)
                return
        self._lines.append(text)
        self._write_log(text)

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._proc is None:
            return
        for channel in self._partial:
            self._read(channel)
        self._kill_timer.stop()
        proc, self._proc = self._proc, None
        # kept until the next start, then deleted there: a deleteLater() from inside this
        # QProcess's own finished/errorOccurred signal crashed Qt (SIGBUS) in the tests
        self._spent = proc
        asked = self.state is ChildState.STOPPING
        self._write_log(f"--- {self.name} exited with code {code}")
        if asked:
            self._move(ChildState.IDLE)
            self.stopped.emit(int(code))
            return
        if time.monotonic() - self._started_at > STABLE_AFTER:
            self._backoff = BACKOFF_FIRST
        # the state is settled before anyone hears of the crash: a handler sees WAITING or IDLE
        if self.restart:
            self._move(ChildState.WAITING)
            self._restart_timer.start(int(self._backoff * 1000))
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        else:
            self._move(ChildState.IDLE)
        self.crashed.emit(int(code), self.last_lines())

    def _hard_stop(self) -> None:
        if self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning:
            self._write_log(f"--- {self.name} did not stop in time: ending it")
            self._proc.kill()  # TerminateProcess on Windows, SIGKILL elsewhere: the last resort

    def wait_stopped(self, timeout_ms: int) -> bool:
        """Block until the child has exited (for quitting the app); True if it did."""
        if self._proc is None:
            return True
        return bool(self._proc.waitForFinished(timeout_ms))

    # ------------------------------------------------------------------ log file
    def _open_log(self) -> None:
        if self._log_file is not None:
            return
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
            # open for the supervisor's lifetime; close() closes it
            self._log_file = open(self.log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as e:
            log.warning("cannot write the log %s: %s", self.log_path, e)

    def _write_log(self, text: str) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
                if self._log_file.tell() > LOG_ROTATE_BYTES:  # a long run: rotate now, not at the next start
                    self.close()
                    self._open_log()

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
