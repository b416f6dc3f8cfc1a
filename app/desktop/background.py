"""Run one network coroutine (pairing, LAN discovery, the firewall rule) off the Qt thread.

Contract: ``Background(make_coro, timeout, describe=...)`` is a ``QObject`` whose ``start()``
runs ``make_coro()`` in its own asyncio loop on a daemon Python thread, bounded by ``timeout``
seconds, and emits ``done(result)`` or ``failed(one sentence)``, delivered on the Qt thread
(queued: the object lives there).  Exceptions never escape: ``describe(exception)`` makes the
sentence, chosen by the exception's type (a timeout arrives as a ``TimeoutError`` saying how
long it waited).  The default, :func:`plain`, gives a
:class:`~app.group.client.GroupCommandError`'s or a :class:`~worker_core.pairing.PairingError`'s
message (meant for people), anything else its type and text.  A daemon thread, not a
``QThread``: quitting the app while an exchange runs must not abort the process (Qt aborts when
a running ``QThread`` is destroyed), and nothing here needs to finish for the app to quit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from PySide6.QtCore import QObject, Signal


def plain(e: BaseException) -> str:
    from app.group.client import GroupCommandError
    from worker_core.pairing import PairingError

    if isinstance(e, (GroupCommandError, PairingError, TimeoutError)):
        return str(e)
    return f"{type(e).__name__}: {e}"[:300]


_RUNNING: set[Background] = set()


class Background(QObject):
    done = Signal(object)
    failed = Signal(str)

    def __init__(
        self,
        make_coro: Callable[[], Awaitable[Any]],
        timeout: float,
        describe: Callable[[BaseException], str] = plain,
    ) -> None:
        # never owned by the dialog that starts it: a dialog closed while its exchange runs must
        # not take the object that emits the outcome with it; it keeps itself alive in _RUNNING
        # until its thread is done, and its signals to a closed dialog go nowhere
        super().__init__(None)
        self._make = make_coro
        self._timeout = timeout
        self._describe = describe
        self._thread = threading.Thread(target=self._run, name="molink-background", daemon=True)

    def start(self) -> None:
        _RUNNING.add(self)
        self._thread.start()

    def _run(self) -> None:
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
        finally:
            _RUNNING.discard(self)
