"""Sends off the execute loop, one at a time, urgent ones first.

Contract
--------
``Outbox(ship)`` owns one task that hands queued items to ``ship`` (an async callable: it
returns once the item has left, e.g. its frame went onto the link and the link drained it).
``put(item, urgent)`` never waits: the stage goes on computing while its previous output
uploads.  Urgent items (decode steps and their results) leave before every item queued
without urgency, each class in its order, so a decode frame waits behind at most the one
frame on the link now, never behind a queue of prefill chunks: the bytes of prefill in flight
on a link are at most one frame beyond the socket's buffers.  A ``ship`` that raises is
logged and the next item goes (the tunnel's reader notices a dead connection).  ``close()``
stops the task and returns the items never shipped, in the order they would have left (the
caller may send them another way); it ends even where a ``ship`` swallowed the cancellation
(Python 3.11's ``wait_for``, :mod:`worker_core.tasks`): once closed, the task takes no other
item, and it is cancelled until it ends.  ``backlog``: items queued.

``split`` (optional) cuts an item queued without urgency into the items that go in its place,
in order, when its turn comes (:func:`worker_core.pieces.split`: a longer frame in pieces).
Urgent items go between those pieces, whole, never split: so a decode frame waits behind at
most one piece, and the pieces of one item are never mixed with another's.  ``close()``
returns the pieces not shipped in that item's place.

``room`` (optional) says whether an item queued without urgency may go now
(:meth:`worker_core.inflight.InFlight.room`: the link's path has room for more bulk bytes
without a queue building at its router); while it says no, the outbox looks again every
``ROOM_POLL`` seconds, and an urgent item put meanwhile leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .tasks import end_tasks

T = TypeVar("T")

log = logging.getLogger("molink.worker")

ROOM_POLL = 0.002  # seconds between looks at a shut room (a 16 KiB piece is 6.5 ms on 20 Mbit/s)


class Outbox(Generic[T]):
    def __init__(
        self,
        ship: Callable[[T], Awaitable[None]],
        split: Callable[[T], list[T]] | None = None,
        room: Callable[[], bool] | None = None,
    ) -> None:
        self._ship = ship
        self._split = split
        self.room = room
        self._urgent: deque[T] = deque()
        self._pieces: deque[T] = deque()  # the rest of the item being shipped in pieces
        self._rest: deque[T] = deque()
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._shipping = False  # an item is being shipped now
        self.overtakes = 0  # urgent items that left before something queued earlier (diagnostics)

    @property
    def backlog(self) -> int:
        return len(self._urgent) + len(self._pieces) + len(self._rest)

    def put(self, item: T, urgent: bool = False) -> None:
        if self._closed:
            raise RuntimeError("outbox closed")
        if urgent:
            if self._rest or self._pieces:
                self.overtakes += 1
            self._urgent.append(item)
        else:
            self._rest.append(item)
        self._ready.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._closed:
            if not self.backlog:
                self._ready.clear()
                await self._ready.wait()
                continue
            if self._urgent:
                item = self._urgent.popleft()
            elif self.room is not None and not self.room():
                self._ready.clear()  # put() sets it: an urgent item goes at once
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), ROOM_POLL)
                continue
            elif self._pieces:
                item = self._pieces.popleft()
            else:
                item, *more = self._split(self._rest.popleft()) if self._split else [self._rest.popleft()]
                self._pieces.extend(more)
            self._shipping = True
            try:
                await self._ship(item)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the connection is going: its reader ends the tunnel
                log.warning("send failed: %s", e or type(e).__name__)
            finally:
                self._shipping = False

    async def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until everything queued has been shipped."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while (self.backlog or self._shipping) and loop.time() < until:
            await asyncio.sleep(0.01)

    async def close(self) -> list[T]:
        """Stop shipping; the items never shipped, urgent ones first."""
        self._closed = True
        self._ready.set()
        if self._task is not None:
            await end_tasks([self._task])
        left = [*self._urgent, *self._pieces, *self._rest]
        self._urgent.clear()
        self._pieces.clear()
        self._rest.clear()
        return left
