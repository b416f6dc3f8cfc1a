"""A user-space link shaper: delay line + token bucket, one per tunnel direction.

Contract: ``LinkShaper(delay_s, rate_bytes_per_s)`` emulates a link of that one-way delay
and bandwidth (this kernel has no ``netem``).  ``await put(frame)`` enqueues a frame; frames
leave in order through ``deliver`` (an async callable) no earlier than

    departure = max(arrival, previous departure) + len(frame) / rate
    delivery  = departure + delay

so a large frame occupies the link for its serialisation time and everything behind it
waits, as on a real slow uplink.  ``rate`` None means unlimited, ``delay`` 0 none; with
both off frames pass straight through.  ``await drained()`` returns once the link has
serialised what it was given (a sender that waits for it keeps its own queue, and so its
own order, instead of the link's).  ``close()`` stops the delivery task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class LinkShaper:
    def __init__(
        self, delay_s: float, rate_bytes_per_s: float | None, deliver: Callable[[bytes], Awaitable[None]]
    ) -> None:
        if delay_s < 0 or (rate_bytes_per_s is not None and rate_bytes_per_s <= 0):
            raise ValueError("link delay must be >= 0 and rate > 0")
        self.delay = delay_s
        self.rate = rate_bytes_per_s
        self.deliver = deliver
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._free_at = 0.0  # loop time when the link has finished serialising what it holds
        self._task: asyncio.Task | None = None

    @property
    def backlog(self) -> int:
        """Frames put and not delivered yet."""
        return self._queue.qsize()

    @property
    def passthrough(self) -> bool:
        return self.delay == 0 and self.rate is None

    async def put(self, frame: bytes) -> None:
        if self.passthrough:
            await self.deliver(frame)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        departure = max(now, self._free_at) + (len(frame) / self.rate if self.rate else 0.0)
        self._free_at = departure
        self._queue.put_nowait((departure + self.delay, frame))
        if self._task is None:
            self._task = loop.create_task(self._run())

    async def drained(self) -> None:
        """Return once every frame put so far has left (serialised; its delay may still run)."""
        if self.rate is None:
            return
        wait = self._free_at - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            at, frame = await self._queue.get()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.deliver(frame)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
