"""Ending asyncio tasks for good.

Contract: ``await end_tasks(tasks, bound)`` cancels every task in ``tasks`` and waits until all
have ended, cancelling again any task that carried on; tasks still running after ``bound``
seconds are left behind with a warning.  For tasks that have nothing to clean up (a step loop,
an engine lane, an event pump, a re-plan): a task whose own teardown must run once,
uninterrupted, wants a single ``cancel()`` instead.

Why again: on Python 3.11 ``asyncio.wait_for`` swallows a cancellation that lands just as its
inner await completes (fixed in 3.12), and a loop around it then runs on; a single ``cancel()``
followed by ``gather`` waited for such a loop forever (a leaving worker hung until its leave
timed out).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("molink.tasks")


async def end_tasks(tasks: Iterable[asyncio.Task], bound: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < end:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    if pending:
        log.warning("%d task(s) did not end within %.0f s of being cancelled", len(pending), bound)
