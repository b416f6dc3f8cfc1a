"""The control channel of a supervised engine process: commands on stdin, events on stdout.

The MoLink app starts ``molink worker``, ``molink master`` and ``molink group create`` as child
processes with ``--supervised`` and controls them through their standard streams, never
through POSIX signals (Windows has none).  This is the one place the protocol is written.

Commands (parent -> child, stdin)
---------------------------------
One JSON object per line: ``{"cmd": NAME}``.  A daemon thread reads them and hands each to
the asyncio loop (``loop.call_soon_threadsafe``); past this module they are :class:`Command`
members, never strings.

* ``"stop"``: graceful stop.  A worker that is connected first tells the master it leaves
  (wire message ``Leave(finish=False)``) and waits, at most ``LEAVE_TIMEOUT`` seconds, for the
  master to close the tunnel (the master re-plans and replays the running requests on the new
  pipeline); then it exits 0.  A worker not connected just exits 0.  A master (``master``,
  ``group create``) stops (closes tunnels and listeners) and exits 0.
* ``"finish"`` (worker): ``Leave(finish=True)``: the master keeps this worker until the
  requests running at that moment have ended (at most ``FINISH_TIMEOUT`` seconds, bounded on
  the master), then re-plans without it and closes the tunnel; the worker then exits 0 (it
  waits at most ``FINISH_TIMEOUT + LEAVE_TIMEOUT``).  A ``"stop"`` while finishing leaves at
  once.  A master given ``"finish"`` treats it as ``"stop"``.
* An unknown or malformed line is logged as a warning and ignored (never a crash).
* **EOF on stdin** (the parent died or closed the pipe) is ``"stop"``.

Events (child -> parent, stdout)
--------------------------------
One per line: the literal prefix ``@molink `` and a one-line JSON object with an ``"event"``
key, flushed at once.  In supervised mode stdout carries nothing else (logging and any other
print go to stderr).  Without ``--supervised`` there is no stdin reading and no event.

* worker: ``{"event": "connecting", "master": "host:port"}`` before each dial;
  ``{"event": "connected", "master": ...}``; ``{"event": "serving", "layers": [start, end],
  "num_layers": N, "epoch": E}`` after each ``Ready`` it sends; ``{"event": "stats", "steps": S,
  "tokens": T, "tokens_per_s": R}`` every ``STATS_INTERVAL`` seconds while connected (S and T:
  steps and rows this stage processed since the process started; R: rows per second over the
  last interval); ``{"event": "disconnected", "reason": "..."}`` when a tunnel ends;
  ``{"event": "left"}`` right before a graceful exit; ``{"event": "error", "message": "one
  line"}`` for a failure the user should see (cannot load layers, cannot reach the master,
  certificate refused).
* master: ``{"event": "listening", "api": "127.0.0.1:PORT", "dashboard": URL-with-token,
  "group_port": PORT-or-null, "group": NAME-or-null, "model": MODEL_ID, "admin_token":
  TOKEN-or-null}`` once listening (``--port 0`` / ``--api-port 0`` pick a free port, reported
  here); ``{"event": "stopping"}`` when it begins to stop.  A master that cannot start may
  also send ``{"event": "error", "message": ...}`` before it exits non-zero.

Contract of this module: :class:`Control` reads commands (``await control.next()``) and knows
nothing of workers or masters; :class:`Events` writes event lines (a disabled ``Events()``
writes nothing).  No torch, no Qt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from enum import Enum
from typing import Any, TextIO

log = logging.getLogger("molink.control")

EVENT_PREFIX = "@molink "
LEAVE_TIMEOUT = 30.0  # seconds a leaving worker waits for the master to close its tunnel
FINISH_TIMEOUT = 300.0  # seconds the master keeps a finishing worker for its running requests
STATS_INTERVAL = 2.0  # seconds between a connected worker's stats events
MAX_LINE_BYTES = 64 * 1024  # a longer command line is malformed


class Command(Enum):
    STOP = "stop"
    FINISH = "finish"


class BadCommand(ValueError):
    """A command line that is not ``{"cmd": NAME}`` with a known NAME."""


def parse_command(line: bytes | str) -> Command:
    """One stdin line -> a :class:`Command`; :class:`BadCommand` says why not."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadCommand(f"not a JSON line: {e}") from None
    if type(obj) is not dict or type(obj.get("cmd")) is not str:
        raise BadCommand('expected {"cmd": NAME}')
    try:
        return Command(obj["cmd"])
    except ValueError:
        raise BadCommand(f"unknown command {obj['cmd'][:40]!r}") from None


class Control:
    """Commands from a file descriptor (default: this process's stdin), read by a daemon thread.

    ``await next()`` returns the next command; the reader starts on the first call (inside the
    running loop).  EOF yields ``Command.STOP`` (and then the stream is not read again).  The
    thread reads the raw descriptor with ``os.read`` (no buffered-reader lock that a daemon
    thread blocked at interpreter exit would hold)."""

    def __init__(self, fd: int | None = None) -> None:
        self._fd = fd
        self._queue: asyncio.Queue[Command] = asyncio.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the reader thread (idempotent); call from the loop that awaits ``next()``."""
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        fd = self._fd if self._fd is not None else sys.stdin.fileno()
        self._thread = threading.Thread(target=self._read, args=(fd, loop), name="molink-control", daemon=True)
        self._thread.start()

    async def next(self) -> Command:
        self.start()
        return await self._queue.get()

    def _read(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        def hand(cmd: Command) -> bool:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, cmd)
                return True
            except RuntimeError:  # the loop is closed: the process is ending anyway
                return False

        pending = b""
        skipping = False  # inside a line longer than MAX_LINE_BYTES
        try:
            while data := os.read(fd, 65536):
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if skipping:
                        skipping = False
                        continue
                    if not line.strip():
                        continue
                    try:
                        cmd = parse_command(line)
                    except BadCommand as e:
                        log.warning("control: ignored a malformed command line: %s", e)
                        continue
                    log.info("control: %s", cmd.value)
                    if not hand(cmd):
                        return
                if len(pending) > MAX_LINE_BYTES:
                    if not skipping:
                        log.warning("control: ignored a command line longer than %d bytes", MAX_LINE_BYTES)
                    pending, skipping = b"", True
        except OSError as e:  # a broken or closed pipe is the parent gone
            log.warning("control: stdin unreadable (%s): stopping", e)
        log.info("control: stdin closed: stopping")
        hand(Command.STOP)


class Events:
    """Writes ``@molink {json}`` lines to ``stream``; with no stream (the default) it is
    disabled and writes nothing.  Thread-safe; a closed pipe disables it (the parent is gone)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def emit(self, event: str, **fields: Any) -> None:
        if self._stream is None:
            return
        line = EVENT_PREFIX + json.dumps({"event": event, **fields}, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            stream = self._stream
            if stream is None:
                return
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):  # broken pipe or closed stream: nobody listens any more
                self._stream = None


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line of at most ``limit`` characters (for ``error`` events)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
