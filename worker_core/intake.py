"""Bound what a relay takes from one leg of a splice to what the next leg carries, so that what
waits to cross waits in the sender's queue, where a decode frame may pass it.

Contract
--------
The relay (:mod:`worker_core.bridge_server`) copies bytes it cannot read from one connection to
another, and gates each copy on the next leg's path (:mod:`worker_core.inflight`): it reads
from the first leg only while the second has room.  That keeps the second leg's router queue
short, but the kernel meanwhile acknowledges whatever fits the first leg's receive buffer, which
it grows on its own to megabytes: the sender's gate, which sees only its own leg, counts those
bytes delivered and sends more, and a decode frame written after them waits at the relay for
all of them.  (Measured 2026-12-07 in the network lab, a sender, a relay and a receiver on
20 Mbit/s links, the receiver's downlink 10 Mbit/s with a router's 200 ms queue, 6 MB of bulk and
a small urgent frame every 50 ms: the urgent frames' p90 wait 0.60-1.04 s ungated, 0.43-0.64 s
with the relay's gate alone, the relay holding up to 1.5 MB unread, 0.21-0.25 s with this bound;
the bulk at 9.6 Mbit/s in each.)

``Intake(transport)`` is the receiving side of one leg (an asyncio transport, anything with
``get_extra_info``).  ``bound(rate)``, called while the next leg's gate holds bytes back
(``rate``: what that leg delivered, bytes/s, :attr:`~worker_core.inflight.InFlight.rate`), sets
the socket's receive buffer (``SO_RCVBUF``, which also stops the kernel's own sizing of it) to
``GAIN * rate * (min_rtt + QUEUE_SECONDS)``, at least ``FLOOR_BYTES``, ``min_rtt`` the first leg's
lowest round trip as the kernel measured it: the first leg then holds about a round trip of what
the second carries, and room for twice that, so a second leg faster than measured is offered
more and its gate, which learns a rate only while it holds bytes back, finds it.  The buffer is
set again only when the bound moves by more than ``CHANGE``, and never beyond what the system
lets a program ask (``net.core.rmem_max``, read once at import): a bound beyond it is not set
at all while the kernel still sizes the buffer itself (its own sizing may go further), and set
to that most where the buffer was bounded before.  Only on Linux (its ``SO_RCVBUF`` and
``rmem_max`` are what this was measured with), and where the connection's counters can be read
(not a test's in-memory transport): elsewhere ``bound`` does nothing.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path
from typing import Any

from .inflight import QUEUE_SECONDS, min_round_trip

GAIN = 2.0  # the first leg may hold twice a round trip of what the second carries
FLOOR_BYTES = 64 * 1024  # never less (four pieces, worker_core.wire.PART_BYTES)
CHANGE = 0.25  # the buffer is set again when the bound moves by more than this fraction


def _most() -> int:
    """``net.core.rmem_max``: the largest ``SO_RCVBUF`` a program may ask (Linux's default where unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    return 212_992


MOST_BYTES = _most()


class Intake:
    """The receive buffer of one leg of a splice (see the module docstring)."""

    def __init__(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket") if transport is not None else None
        linux = sys.platform.startswith("linux")
        self._sock = sock if linux and sock is not None and min_round_trip(sock) is not None else None
        self.size: int | None = None  # the receive buffer last set (None: the kernel's own)

    def bound(self, rate: float) -> None:
        """The next leg delivers ``rate`` bytes/s: size this leg's receive buffer to it."""
        if self._sock is None or rate <= 0:
            return
        rtt = min_round_trip(self._sock)
        if rtt is None:
            self._sock = None
            return
        size = int(max(FLOOR_BYTES, GAIN * rate * (rtt + QUEUE_SECONDS)))
        if size > MOST_BYTES:
            if self.size is None:
                return
            size = MOST_BYTES
        if self.size is not None and abs(size - self.size) <= CHANGE * self.size:
            return
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            self.size = size
