"""Keep a link's bytes in flight near what its path carries, so that the queue of the router on
the way stays short and a decode frame never waits behind a prefill chunk's bytes there.

Contract
--------
The senders put a decode step's frame before the pieces of a longer frame still queued
(:mod:`worker_core.outbox`, :mod:`worker_core.pieces`) and keep the kernel's unsent bytes few
(:mod:`worker_core.unsent`).  Bytes already sent are out of their hands: a TCP sender (CUBIC:
Windows' and most Linux systems' default) grows its window until the slowest router on the
path drops packets, so a home router's buffer (often 100 ms to seconds of data) fills with a
prefill chunk's bytes and every decode frame behind them waits that long.

``InFlight(transport, queue_seconds=QUEUE_SECONDS)`` reads the connection's TCP counters
and tells a sender of bulk bytes when a piece may go (:meth:`InFlight.room`; ``spare``: the
bytes that may go at once, as of that look): while the bytes sent and not yet acknowledged, plus
those the kernel holds unsent, are below ``rate * (min_rtt + queue_seconds)``, at least
``FLOOR_BYTES``.  ``rate`` is what the path delivered while this gate held bytes back (the bytes
acknowledged per second over a round trip or ``SAMPLE_SECONDS``, the highest of the last
``RATE_SAMPLES`` such windows); ``min_rtt`` the kernel's lowest round trip.  At that size the
path stays full (what is in flight covers a round trip at the rate it delivers) and its queue
holds about ``queue_seconds``: a path faster than measured shows it by delivering more in the
next window, so the gate opens further each round trip.  That alone opens it by
``queue_seconds / min_rtt`` a round trip, slowly where the round trip is long, so a connection
starts by probing (``probing``, as TCP's slow start and BBR's start-up do): its round trip
counted ``STARTUP_GAIN`` times, so the gate about doubles each round trip while the path keeps
up, until ``FULL_WINDOWS`` held-back windows in a row deliver less than ``GROWTH`` times the best
before them (the path is full); for that round trip or two the path's queue may hold up to a
round trip of ours.  (Measured 2026-12-07 through a delay line
of TUN devices, :mod:`app.tools.netlab.tunlink`, 6 MB of bulk with a small urgent frame every
50 ms, CUBIC, two runs each: at 200 ms round trip on 20 Mbit/s the bulk crossed at 6.9-7.1 Mbit/s
without the probing, 14.3 with it, 15.5 without the gate; on 50 Mbit/s 7.0-7.3, 20.4-20.7, 25.9;
at 80 ms on 50 Mbit/s 23.9-24.1, 35.6, 38.9.  The urgent frames' p90 wait: at 200 ms 0.11-0.16 s
with or without the probing, 0.15 without the gate (the connection's own start); at 80 ms
0.02-0.04 s, 0.01-0.02 without the probing, 0.044-0.047 without the gate; their median rose from
0-8 ms to 7-22 ms.)  Urgent frames (decode steps) never ask it.  A gate that held bytes back
``MAX_HOLD_SECONDS`` lets one piece go (a link that delivers nothing is for its heartbeats to
find).  The counters come from :mod:`worker_core.tcp_info` (Linux's ``TCP_INFO``, Windows'
``SIO_TCP_INFO``).  Windows does not say how many bytes its stack holds unsent: there the
senders tell the gate what they hand the connection (:meth:`InFlight.wrote`, every frame and
piece, urgent ones too) and the unsent bytes are that count less the bytes the stack sent, less
the lowest that difference has been (bytes sent that nobody counted: the TLS records' overhead,
the WebSocket's pings and headers; at a quiet moment the difference is exactly those).  Where
the count is left out it reads low, never high, so the gate errs towards letting bytes go.
Such a stack has no ``TCP_NOTSENT_LOWAT`` either (:mod:`worker_core.unsent`): the gate holds
bulk bytes there as well while ``UNSENT_BYTES`` of what it counted wait unsent, the bound Linux's
kernel keeps (without it, emulated on Linux's TCP over 200 ms, the decode frames' p90 wait was
0.15 s against 0.22 s ungated and 0.02-0.05 s with the kernel's bound).
(A window in place of the count, tried first, did not help: emulated on Linux's TCP over 200 ms,
the kernel held up to 335 kB unsent under a 239 kB window while 9 kB were in flight.)  Where the
counters cannot be read (macOS, a test's in-memory transport, a closed socket) :meth:`room` is
always True: the senders behave as without it.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from . import tcp_info
from .unsent import UNSENT_BYTES

QUEUE_SECONDS = 0.015  # the queue a path's router may hold of ours: a decode frame waits about this
FLOOR_BYTES = 32 * 1024  # never fewer in flight (two pieces, wire.PART_BYTES): a link is never starved
SAMPLE_SECONDS = 0.05  # shortest window a delivery rate is measured over
RATE_SAMPLES = 8  # the rate is the highest of the last this many held-back windows
MAX_HOLD_SECONDS = 2.0  # a gate shut this long lets one piece through
STARTUP_GAIN = 2.0  # while probing, the round trip counts this many times in the target
GROWTH = 1.25  # a held-back window delivering this much more than the best before it: the path kept up
FULL_WINDOWS = 3  # held-back windows in a row without such growth end the probing


class InFlight:
    """The gate of one TCP connection's bulk bytes (see the module docstring)."""

    def __init__(self, transport: Any, queue_seconds: float = QUEUE_SECONDS) -> None:
        sock = transport.get_extra_info("socket") if transport is not None else None
        self.queue_seconds = queue_seconds  # the queue the path's router may hold of ours
        self._sock = sock if tcp_info.readable(sock) else None
        self._rates: deque[float] = deque(maxlen=RATE_SAMPLES)  # bytes/s of the last held-back windows
        self._window: tuple[float, int] | None = None  # (start, bytes acknowledged then) of the window measured
        self._held = False  # the gate held bytes back in the window being measured
        self._shut_since: float | None = None
        self.holds = 0  # times a piece was held back (diagnostics)
        self.probing = True  # the start-up: the gate about doubles each round trip while the path keeps up
        self._flat = 0  # held-back windows in a row that did not grow the rate by GROWTH
        self.spare = 0  # bytes below the target at the last look (room): what may go at once
        self.handed = 0  # bytes the senders handed the connection (wrote): the unsent count where the OS has none
        self._uncounted: int | None = None  # the lowest (handed - sent) seen: bytes sent that nobody counted

    @property
    def measurable(self) -> bool:
        return self._sock is not None

    @property
    def rate(self) -> float:
        """Bytes/s the path delivered while the gate held bytes back (the highest recent window; 0: none yet)."""
        return max(self._rates, default=0.0)

    def wrote(self, nbytes: int) -> None:
        """The sender handed the connection ``nbytes`` more (any frame or piece)."""
        self.handed += nbytes

    def _info(self) -> tuple[int, int, float, bool] | None:
        """(bytes in flight, bytes unsent, min round trip seconds, whether unsent is this gate's
        own count), or None."""
        c = tcp_info.read(self._sock) if self._sock is not None else None
        if c is None:
            self._sock = None
            return None
        self._sample(c.acked, c.min_rtt)
        if c.unsent is not None:
            return c.flight, c.unsent, c.min_rtt, False
        gap = self.handed - c.sent
        self._uncounted = gap if self._uncounted is None else min(self._uncounted, gap)
        return c.flight, gap - self._uncounted, c.min_rtt, True

    def _sample(self, acked: int, min_rtt: float) -> None:
        now = time.monotonic()
        if self._window is None:
            self._window, self._held = (now, acked), False
            return
        start, before = self._window
        if now - start < max(SAMPLE_SECONDS, min_rtt):
            return
        if self._held:  # the path, not the sender, set the pace in this window
            rate = (acked - before) / (now - start)
            if self.probing:
                self._flat = 0 if rate >= GROWTH * self.rate else self._flat + 1
                self.probing = self._flat < FULL_WINDOWS
            self._rates.append(rate)
        self._window, self._held = (now, acked), False

    def target(self, min_rtt: float) -> float:
        """Bytes the gate lets be in flight and unsent."""
        gain = STARTUP_GAIN if self.probing else 1.0
        return max(FLOOR_BYTES, self.rate * (gain * min_rtt + self.queue_seconds))

    def room(self) -> bool:
        """May a piece of bulk bytes be written now?"""
        info = self._info()
        if info is None:
            return True
        flight, unsent, min_rtt, counted = info
        now = time.monotonic()
        spare = int(self.target(min_rtt)) - flight - unsent
        if counted:  # no kernel keeps its unsent bytes few (TCP_NOTSENT_LOWAT): the gate does
            spare = min(spare, UNSENT_BYTES - unsent)
        self.spare = max(0, spare)
        if self.spare > 0:
            self._shut_since = None
            return True
        self._held = True
        if self._shut_since is None:
            self._shut_since = now
        elif now - self._shut_since >= MAX_HOLD_SECONDS:
            self._shut_since = now
            return True
        self.holds += 1
        return False


def min_round_trip(sock: Any) -> float | None:
    """The lowest round trip the kernel measured on TCP socket ``sock``'s connection, in seconds
    (0.0: none yet); None where its counters cannot be read (:mod:`worker_core.tcp_info`)."""
    c = tcp_info.read(sock)
    return c.min_rtt if c is not None else None


def gate(transport: Any, queue_seconds: float = QUEUE_SECONDS) -> InFlight | None:
    """An :class:`InFlight` for ``transport`` (anything with ``get_extra_info``: an asyncio
    transport, an aiohttp WebSocket) where it can measure, else None."""
    with contextlib.suppress(Exception):
        g = InFlight(transport, queue_seconds)
        if g.measurable:
            return g
    return None


def room_of(g: InFlight | None) -> Callable[[], bool] | None:
    """:meth:`InFlight.room` of ``g`` (an :class:`~worker_core.outbox.Outbox`'s ``room``), or None."""
    return g.room if g is not None else None


def counted(send: Callable[[bytes], Awaitable[object]], g: InFlight | None) -> Callable[[bytes], Awaitable[None]]:
    """``send`` (a connection's own: its bytes go onto it), telling ``g`` first what it hands over."""

    async def sending(data: bytes) -> None:
        if g is not None:
            g.wrote(len(data))
        await send(data)

    return sending
