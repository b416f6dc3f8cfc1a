"""Windows only: is a fullscreen game, presentation or "busy" fullscreen app in front?

Contract: :func:`fullscreen_app_running` asks ``shell32.SHQueryUserNotificationState`` (the state
Windows itself uses to hold back notifications) and returns True for ``QUNS_BUSY`` (a fullscreen
app), ``QUNS_RUNNING_D3D_FULL_SCREEN`` (an exclusive-mode Direct3D game) and
``QUNS_PRESENTATION_MODE``; False for every other state and on any error (never raises).
``shell32`` can be injected (tests pass a fake with the same function); the module imports on
any OS and touches ``ctypes.windll`` only when called without one.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

log = logging.getLogger("molink.fullscreen")

QUNS_NOT_PRESENT = 1  # screen saver, locked, fast user switching
QUNS_BUSY = 2  # a fullscreen application runs
QUNS_RUNNING_D3D_FULL_SCREEN = 3  # an exclusive-mode Direct3D application runs
QUNS_PRESENTATION_MODE = 4  # the user turned presentation mode on
QUNS_ACCEPTS_NOTIFICATIONS = 5
QUNS_QUIET_TIME = 6
QUNS_APP = 7  # a Windows Store app runs fullscreen (not a game signal)

FULLSCREEN_STATES = frozenset({QUNS_BUSY, QUNS_RUNNING_D3D_FULL_SCREEN, QUNS_PRESENTATION_MODE})


def _shell32() -> Any:
    if sys.platform != "win32":
        raise OSError("shell32 is Windows only")
    return ctypes.windll.shell32


def notification_state(shell32: Any | None = None) -> int | None:
    """The QUERY_USER_NOTIFICATION_STATE value, or None if it cannot be read."""
    try:
        lib = shell32 if shell32 is not None else _shell32()
        state = ctypes.c_int(0)
        hr = lib.SHQueryUserNotificationState(ctypes.byref(state))
        if hr != 0:  # S_OK
            log.debug("SHQueryUserNotificationState failed: HRESULT %#x", hr & 0xFFFFFFFF)
            return None
        return state.value
    except Exception as e:  # not Windows, old Windows, ctypes trouble
        log.debug("notification state unknown: %s", e)
        return None


def fullscreen_app_running(shell32: Any | None = None) -> bool:
    return notification_state(shell32) in FULLSCREEN_STATES
