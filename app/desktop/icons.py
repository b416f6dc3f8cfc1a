"""The tray's four state icons and the app icon, as QIcons with every rendered size.

Contract
--------
* :class:`IconKind` (``OFF``, ``SHARING``, ``PAUSED``, ``PROBLEM``) is the one in
  :mod:`app.desktop.state` (re-exported), so ``tray_icon(state.icon_kind(snapshot))`` just works.
* :func:`tray_icon` returns a ``QIcon`` holding ``<kind>-<size>.png`` for every size in
  ``TRAY_SIZES``, so Qt picks a sharp pixmap for the taskbar's size and the screen's scale.
* :func:`app_icon` does the same with ``molink-<size>.png`` (window and taskbar icon).
* :func:`icons_dir` finds ``assets/icons``: in the source tree, or in a frozen (PyInstaller)
  build under ``sys._MEIPASS/assets/icons``.
* :func:`missing_files` lists expected PNGs that are not there (the app's ``--selftest`` and tests).

The PNGs are rendered from SVG sources by ``assets/icons/render.py`` and committed.  A QIcon needs a
``QGuiApplication``; icons are built once per process and cached.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from PySide6.QtCore import QSize
from PySide6.QtGui import QIcon

from .state import IconKind

__all__ = [
    "IconKind",
    "TRAY_SIZES",
    "APP_SIZES",
    "icons_dir",
    "tray_icon",
    "app_icon",
    "tray_icon_file",
    "missing_files",
]

TRAY_SIZES = (16, 20, 24, 32, 40, 48, 64, 128, 256)  # as rendered by assets/icons/render.py
APP_SIZES = (16, 22, 24, 32, 48, 64, 128, 256)


def icons_dir() -> Path:
    meipass = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and meipass:
        return Path(meipass) / "assets" / "icons"
    return Path(__file__).resolve().parents[2] / "assets" / "icons"


def tray_icon_file(kind: IconKind, size: int) -> Path:
    return icons_dir() / f"{kind.value}-{size}.png"


def _icon(files: list[tuple[Path, int]]) -> QIcon:
    icon = QIcon()
    for path, size in files:
        if path.is_file():
            icon.addFile(str(path), QSize(size, size))
    return icon


@cache
def tray_icon(kind: IconKind) -> QIcon:
    return _icon([(tray_icon_file(kind, s), s) for s in TRAY_SIZES])


@cache
def app_icon() -> QIcon:
    return _icon([(icons_dir() / f"molink-{s}.png", s) for s in APP_SIZES])


def missing_files() -> list[Path]:
    d = icons_dir()
    want = [tray_icon_file(k, s) for k in IconKind for s in TRAY_SIZES]
    want += [d / f"molink-{s}.png" for s in APP_SIZES] + [d / "molink.ico"]
    return [p for p in want if not p.is_file()]
