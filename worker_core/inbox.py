"""The worker's inbox: decode steps go first, everything else keeps its arrival order.

Contract
--------
``Inbox(held, clock, patience)`` queues what the execute loop handles next (the master's frames and the steps
the previous stage sends over its direct hop): ``put_nowait(msg, arrived)``, ``await get()``
-> ``(msg, arrived, urgent)``, ``qsize()``.  A message is *urgent* (:func:`urgent`) when it is a
``Step`` whose every segment is one token continuing a cache this stage holds exactly up to
that token (``held(request_id) == start > 0``): a decode step, which needs nothing queued
ahead of it.  Urgent messages leave before the others, each class in arrival order, so a
decode step waits behind at most the step being computed, never behind a queue of prefill
chunks; but never for ever: once the oldest other message has waited ``patience`` seconds
(``clock`` is the clock of the ``arrived`` stamps), it leaves first.  Where decode steps keep
a stage busy all the time (several streams looping back on a compute-bound stage) a prompt's
chunk would otherwise wait for as long as they keep coming: 12 s was measured, and the
master took the stage's hop for a dead one.  The chunk, once running, pauses between its
layers for the decode steps (``serve_urgent``), so letting it start costs them a few layers.
Everything else (prefill chunks, mixed steps, ``Assign``, ``Route``, ``Free``,
protocol errors) keeps its order: a prompt's chunks, which may be several in flight, arrive in
order, and a ``Free`` never overtakes a step of the cache it drops.  ``held`` (a request id's
cached tokens on this stage, or None while no stage is served) is read when a message is
queued.  Pure asyncio, no I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

from .wire import Step

Held = Callable[[int], int]

PATIENCE = 0.5  # seconds a prefill chunk (or any message but a decode step) waits at most behind decode steps


def urgent(msg: object, held: Held | None) -> bool:
    """A decode step that continues this stage's caches exactly (see the module docstring)."""
    if held is None or not isinstance(msg, Step) or not msg.segments:
        return False
    return all(s.length == 1 and s.start > 0 and held(s.request_id) == s.start for s in msg.segments)


class Inbox:
    def __init__(
        self,
        held: Callable[[], Held | None],
        clock: Callable[[], float] = time.perf_counter,
        patience: float = PATIENCE,
    ) -> None:
        self._held = held
        self._clock = clock
        self._patience = patience
        self._urgent: deque[tuple[object, float, bool]] = deque()
        self._rest: deque[tuple[object, float, bool]] = deque()
        self._ready = asyncio.Event()
        self.overtakes = 0  # urgent messages that left before something queued earlier (diagnostics)
        self.impatient = 0  # messages that left before waiting decode steps, having waited ``patience`` (diagnostics)

    def qsize(self) -> int:
        return len(self._urgent) + len(self._rest)

    def put_nowait(self, msg: object, arrived: float) -> None:
        if urgent(msg, self._held()):
            if self._rest:
                self.overtakes += 1
            self._urgent.append((msg, arrived, True))
        else:
            self._rest.append((msg, arrived, False))
        self._ready.set()

    async def serve_urgent(self, handle: Callable[[object, float, bool], Awaitable[None]]) -> int:
        """Hand the urgent messages queued now to ``handle``, oldest first (a longer step pauses
        between its layers for them); those arriving meanwhile wait for the next pause, or a
        stream of them would starve the paused step.  Returns how many were handled."""
        n = len(self._urgent)
        for _ in range(n):
            await handle(*self._urgent.popleft())
        return n

    async def get(self) -> tuple[object, float, bool]:
        while not (self._urgent or self._rest):
            self._ready.clear()
            await self._ready.wait()
        if self._urgent and self._rest and self._clock() - self._rest[0][1] >= self._patience:
            self.impatient += 1
            return self._rest.popleft()
        return self._urgent.popleft() if self._urgent else self._rest.popleft()
