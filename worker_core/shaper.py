"""A user-space link shaper: delay line + token bucket, one per tunnel direction.

Contract: ``LinkShaper(delay_s, rate_bytes_per_s, deliver, passes=None)`` emulates a link of that
one-way delay and bandwidth (this kernel has no ``netem``).  ``await put(frame)`` hands it a
frame; the link serialises one frame at a time, at ``rate``, and delivers each (``deliver``, an
async callable) ``delay`` after its last byte left, in the order they left:

    departure = max(its turn, previous departure) + len(frame) / rate
    delivery  = departure + delay

so a large frame occupies the link for its serialisation time and everything behind it
waits, as on a real slow link.  A frame's turn comes in the order frames were put, except that
a frame for which ``passes(frame)`` is true goes before every frame still waiting for its turn
(not before the one on the link now): the sender's own queue, where the sender orders what
waits (the master lets a decode step's frame go between a longer frame's pieces,
:mod:`master_core.link`).  A shaper of what arrives from the master (the worker's downlink) is
given that rule, so the queue the master would keep on a real link is kept here in its order.
``rate`` None means unlimited, ``delay`` 0 none; with both off frames pass straight through.
``await drained()`` returns once the link has serialised what it was given (a sender that waits
for it keeps its own queue, and so its own order, instead of the link's).  ``backlog``: frames
put and not delivered yet.  ``close()`` stops the delivery tasks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable


class LinkShaper:
    def __init__(
        self,
        delay_s: float,
        rate_bytes_per_s: float | None,
        deliver: Callable[[bytes], Awaitable[None]],
        passes: Callable[[bytes], bool] | None = None,
    ) -> None:
        if delay_s < 0 or (rate_bytes_per_s is not None and rate_bytes_per_s <= 0):
            raise ValueError("link delay must be >= 0 and rate > 0")
        self.delay = delay_s
        self.rate = rate_bytes_per_s
        self.deliver = deliver
        self._passes = passes
        self._first: deque[bytes] = deque()  # waiting for their turn, before the rest
        self._rest: deque[bytes] = deque()
        self._turn = asyncio.Event()
        self._line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()  # left the sender: (delivery time, frame)
        self._free_at = 0.0  # loop time when the link has finished serialising the frame on it
        self._tasks: list[asyncio.Task] = []

    @property
    def backlog(self) -> int:
        """Frames put and not delivered yet."""
        return len(self._first) + len(self._rest) + self._line.qsize()

    @property
    def passthrough(self) -> bool:
        return self.delay == 0 and self.rate is None

    async def put(self, frame: bytes) -> None:
        if self.passthrough:
            await self.deliver(frame)
            return
        (self._first if self._passes is not None and self._passes(frame) else self._rest).append(frame)
        self._turn.set()
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._serialise()), loop.create_task(self._run())]

    async def drained(self) -> None:
        """Return once every frame put so far has left (serialised; its delay may still run)."""
        if self.rate is None:
            return
        now = asyncio.get_running_loop().time()
        waiting = sum(map(len, self._first)) + sum(map(len, self._rest))  # not on the link yet
        wait = max(now, self._free_at) + waiting / self.rate - now
        if wait > 0:
            await asyncio.sleep(wait)

    async def _serialise(self) -> None:
        """One frame at a time onto the link, the passing ones first."""
        loop = asyncio.get_running_loop()
        while True:
            if not (self._first or self._rest):
                self._turn.clear()
                await self._turn.wait()
                continue
            frame = (self._first or self._rest).popleft()
            departure = max(loop.time(), self._free_at) + (len(frame) / self.rate if self.rate else 0.0)
            self._free_at = departure
            self._line.put_nowait((departure + self.delay, frame))
            wait = departure - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the link is busy with it: the next one's turn comes after

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            at, frame = await self._line.get()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.deliver(frame)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
