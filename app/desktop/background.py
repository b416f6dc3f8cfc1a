"""Run one network coroutine (pairing, LAN discovery) off the Qt thread.

Contract: ``Background(make_coro, timeout, describe=...)`` is a ``QThread`` that runs
``make_coro()`` in its own asyncio loop, bounded by ``timeout`` seconds, and emits
``done(result)`` or ``failed(one sentence)`` on the Qt thread (queued signals).  Exceptions
never escape: ``describe(exception)`` makes the sentence, chosen by the exception's type (a
timeout arrives as a ``TimeoutError`` saying how long it waited).  The default,
:func:`plain`, gives a :class:`~app.group.client.GroupCommandError`'s or a
:class:`~worker_core.pairing.PairingError`'s message (meant for people), anything else its
type and text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from PySide6.QtCore import QThread, Signal


def plain(e: BaseException) -> str:
    from app.group.client import GroupCommandError
    from worker_core.pairing import PairingError

    if isinstance(e, (GroupCommandError, PairingError, TimeoutError)):
        return str(e)
    return f"{type(e).__name__}: {e}"[:300]


_RUNNING: set[QThread] = set()


class Background(QThread):
    done = Signal(object)
    failed = Signal(str)

    def __init__(
        self,
        make_coro: Callable[[], Awaitable[Any]],
        timeout: float,
        parent=None,  # noqa: ANN001 - a QObject
        describe: Callable[[BaseException], str] = plain,
    ) -> None:
        # never owned by the dialog that starts it: closing a dialog while its exchange runs must
        # not destroy a running QThread (Qt aborts the process); the thread keeps itself alive
        # in _RUNNING until it has finished, and its signals to a closed dialog go nowhere
        super().__init__(None)
        _RUNNING.add(self)
        self.finished.connect(lambda: _RUNNING.discard(self))
        self._make = make_coro
        self._timeout = timeout
        self._describe = describe

    def run(self) -> None:
        async def bounded() -> Any:
            return await asyncio.wait_for(self._make(), self._timeout)

        try:
            result = asyncio.run(bounded())
        except asyncio.TimeoutError:
            self.failed.emit(self._describe(TimeoutError(f"no answer within {self._timeout:.0f} seconds")))
        except Exception as e:  # one sentence for the dialog, never a traceback
            self.failed.emit(self._describe(e))
        else:
            self.done.emit(result)
