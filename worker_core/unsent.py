"""Keep the bytes a link's kernel holds unsent few, so that what waits keeps its order.

Contract
--------
The senders order their frames themselves: a decode step's frame goes before the pieces of a
prefill step's (:mod:`worker_core.outbox`, :mod:`worker_core.pieces`).  That only helps while the
pieces wait in the sender's queue.  A TCP socket otherwise takes every piece it is given into its
send buffer, which the kernel grows to megabytes on a fast sender and a slow path; a decode frame
written after them then waits for all of them to cross the link.

``keep_unsent_low(transport)`` asks the kernel of ``transport``'s TCP socket to take more only
while fewer than ``UNSENT_BYTES`` of what it holds are still unsent (``TCP_NOTSENT_LOWAT``:
Linux, macOS).  The rest then waits above it, in the event loop's buffer and in the outbox,
where a decode frame may pass it.  Bytes already sent and not yet acknowledged are not counted
(the link's round trip is the link's).  Returns whether it was set: False where the OS lacks the
option (Windows), the transport has no TCP socket (a test's in-memory one), or the socket refuses.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

UNSENT_BYTES = 32 * 1024  # two pieces (wire.PART_BYTES): the kernel always has the next one to send
# (no import of wire here: the relay, molink relay, sets it too and runs without torch)
_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", None)


def keep_unsent_low(transport: Any) -> bool:
    """Set ``TCP_NOTSENT_LOWAT`` to ``UNSENT_BYTES`` on ``transport``'s socket (anything with
    ``get_extra_info``: an asyncio transport, an aiohttp WebSocket); see the module docstring."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if _LOWAT is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, _LOWAT, UNSENT_BYTES)
        return True
    return False
