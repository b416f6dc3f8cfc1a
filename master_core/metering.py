"""Bytes arriving on a WebSocket's connection, before any frame is complete.

Contract
--------
``on_bytes(request, callback)`` makes the server connection of ``request`` (an upgraded
WebSocket, after ``WebSocketResponse.prepare``) call ``callback()`` each time bytes arrive on
it, whether or not they complete a frame.  Returns False (nothing installed) where the
installed aiohttp has no such hook; the caller then judges liveness by complete frames only.

Why: on a slow link one large frame (a prompt chunk's activations, 8 MiB at 20 Mbit/s is
3.4 s) is several seconds in transit, and a pong sent after it arrives only after it.  A link
judged by complete frames would call such a worker silent; counted by bytes it is heard all
the while.  aiohttp (3.11 and later) calls its request handler's ``_data_received_cb`` on
every chunk of bytes of an upgraded connection (it resets its own heartbeat that way); that
one private slot is the whole dependence, checked here, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

_HOOK = "_data_received_cb"


def on_bytes(request: web.BaseRequest, callback: Callable[[], None]) -> bool:
    """Call ``callback()`` whenever bytes arrive on ``request``'s connection; False where the
    installed aiohttp cannot say (then nothing is installed)."""
    protocol = request.protocol
    if protocol is None or not hasattr(protocol, _HOOK):
        return False
    before: Callable[[], None] | None = getattr(protocol, _HOOK)

    def arrived() -> None:
        callback()
        if before is not None:
            before()

    try:
        setattr(protocol, _HOOK, arrived)
    except AttributeError:  # a layout this module does not know: complete frames only
        return False
    return True
