"""How a child process is created without a console window: the leaf every starter shares.

Contract: ``no_window_flags()`` is the ``creationflags`` that keep a console window from
flashing on Windows when a windowed app starts a child (:data:`CREATE_NO_WINDOW`), 0 elsewhere.
Imports nothing of MoLink (the runtime builder, the engine starter and the tray's supervisor use it).
"""

from __future__ import annotations

import sys

CREATE_NO_WINDOW = 0x08000000  # Windows process creation flag


def no_window_flags() -> int:
    return CREATE_NO_WINDOW if sys.platform == "win32" else 0
