"""Run one network coroutine (pairing, LAN discovery) off the Qt thread.

Contract: ``Background(make_coro, timeout)`` is a ``QThread`` that runs ``make_coro()`` in its
own asyncio loop, bounded by ``timeout`` seconds, and emits ``done(result)`` or
``failed(one sentence)`` on the Qt thread (queued signals).  Exceptions never escape: a
:class:`~app.group.GroupCommandError` gives its message, anything else its type and text.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from PySide6.QtCore import QThread, Signal


class Background(QThread):
    done = Signal(object)
    failed = Signal(str)

    def __init__(self, make_coro: Callable[[], Awaitable[Any]], timeout: float, parent=None) -> None:  # noqa: ANN001
        super().__init__(parent)
        self._make = make_coro
        self._timeout = timeout

    def run(self) -> None:
        from app.group import GroupCommandError

        async def bounded() -> Any:
            return await asyncio.wait_for(self._make(), self._timeout)

        try:
            result = asyncio.run(bounded())
        except GroupCommandError as e:
            self.failed.emit(str(e))
        except asyncio.TimeoutError:
            self.failed.emit(f"no answer within {self._timeout:.0f} seconds")
        except Exception as e:  # one sentence for the dialog, never a traceback
            self.failed.emit(f"{type(e).__name__}: {e}"[:300])
        else:
            self.done.emit(result)
