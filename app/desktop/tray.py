"""The two faces of the app: a tray icon with its menu, or a small window with the same controls.

Contract: both views take a ``snapshot`` callable (-> :class:`TrayState`) and emit
``triggered(Act)`` for a user command; they hold no logic.  The tray menu is rebuilt from a
fresh snapshot each time it opens (``aboutToShow``) and whenever the state changes while it
is open; the window rebuilds its buttons on ``refresh()``.  Window mode is for desktops
without a tray (``QSystemTrayIcon.isSystemTrayAvailable()`` false, e.g. GNOME without its
AppIndicator extension); closing that window quits the app.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QMenu, QPushButton, QSystemTrayIcon, QVBoxLayout, QWidget

from . import icons
from .state import Act, Action, Item, Separator, Submenu, TrayState, icon_kind, menu, tooltip


def fill_menu(qmenu: QMenu, items: list[Item], on: Callable[[Act], None], enabled: bool = True) -> None:
    """Put ``items`` into ``qmenu`` (cleared first); each action calls ``on(act)``; a disabled
    submenu's actions are disabled too."""
    qmenu.clear()
    for it in items:
        if isinstance(it, Separator):
            qmenu.addSeparator()
        elif isinstance(it, Submenu):
            sub = qmenu.addMenu(it.text)
            sub.setEnabled(it.enabled)
            fill_menu(sub, list(it.items), on, enabled and it.enabled)
        else:
            a = QAction(it.text, qmenu)
            a.setEnabled(enabled and it.enabled)
            if it.checked is not None:
                a.setCheckable(True)
                a.setChecked(it.checked)
            a.setData(it.act.value)
            a.triggered.connect(lambda _=False, act=it.act: on(act))
            qmenu.addAction(a)


def _icon_for(s: TrayState):  # -> QIcon
    return icons.tray_icon(icons.IconKind[icon_kind(s).name])


class TrayView(QObject):
    triggered = Signal(object)  # Act

    def __init__(self, snapshot: Callable[[], TrayState], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.snapshot = snapshot
        self.menu = QMenu()
        self.menu.aboutToShow.connect(self.rebuild)
        self.tray = QSystemTrayIcon()
        self.tray.setContextMenu(self.menu)
        self.tray.activated.connect(self._activated)
        self.refresh()
        self.rebuild()

    def show(self) -> None:
        self.tray.show()

    def hide(self) -> None:
        self.tray.hide()

    def rebuild(self) -> None:
        fill_menu(self.menu, menu(self.snapshot(), time.time()), self.triggered.emit)

    def refresh(self) -> None:
        s = self.snapshot()
        self.tray.setIcon(_icon_for(s))
        self.tray.setToolTip(tooltip(s, time.time()))
        if self.menu.isVisible():
            self.rebuild()

    def notify(self, title: str, message: str) -> None:
        self.tray.showMessage(title, message, QSystemTrayIcon.MessageIcon.Information, 8000)

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason is QSystemTrayIcon.ActivationReason.DoubleClick:
            self.triggered.emit(Act.OPEN_CHAT)


class MainWindow(QWidget):
    """Window mode: the tray menu's controls as a small window."""

    triggered = Signal(object)  # Act

    def __init__(self, snapshot: Callable[[], TrayState], note: str = "") -> None:
        super().__init__()
        self.setWindowTitle("MoLink")
        self.snapshot = snapshot
        self.has_tray = False  # a tray appeared later: closing hides instead of quitting
        self.setWindowIcon(icons.app_icon())
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.share = QCheckBox("Share my GPU")
        self.share.clicked.connect(lambda _=False: self.triggered.emit(Act.SHARE))
        self.buttons = QVBoxLayout()
        self.log = QLabel()
        self.log.setWordWrap(True)
        self.log.setStyleSheet("font-family: monospace; color: #c62828;")
        lay = QVBoxLayout(self)
        lay.addWidget(self.status)
        lay.addWidget(self.share)
        lay.addLayout(self.buttons)
        lay.addWidget(self.log)
        if note:
            n = QLabel(note)
            n.setWordWrap(True)
            n.setStyleSheet("color: gray;")
            lay.addWidget(n)
        self.refresh()

    def refresh(self) -> None:
        s = self.snapshot()
        now = time.time()
        self.status.setText(tooltip(s, now).replace("MoLink\n", "", 1))
        self.setWindowIcon(_icon_for(s))
        self.log.setText("\n".join(s.last_log[-5:]) if s.problem and s.last_log else "")
        while self.buttons.count():
            item = self.buttons.takeAt(0)
            if item is None:
                break
            layout = item.layout()
            if layout is not None:
                while layout.count():
                    inner = layout.takeAt(0)
                    w = inner.widget() if inner is not None else None
                    if w is not None:
                        w.setParent(None)
                        w.deleteLater()
                layout.setParent(None)
        row: QHBoxLayout | None = None
        for it in menu(s, now):
            if isinstance(it, Action) and it.act is Act.SHARE:
                self.share.setText(it.text)
                self.share.setEnabled(it.enabled)
                self.share.setChecked(bool(it.checked))
                continue
            if isinstance(it, Action) and it.act is Act.STATUS:
                continue
            if isinstance(it, Separator) or row is None:
                row = QHBoxLayout()
                self.buttons.addLayout(row)
                if isinstance(it, Separator):
                    continue
            actions = list(it.items) if isinstance(it, Submenu) else [it]
            for a in actions:
                if not isinstance(a, Action):
                    continue
                text = f"{it.text}: {a.text}" if isinstance(it, Submenu) else a.text
                b = QPushButton(text)
                b.setEnabled(a.enabled and (it.enabled if isinstance(it, Submenu) else True))
                b.setProperty("act", a.act.value)
                b.clicked.connect(lambda _=False, act=a.act: self.triggered.emit(act))
                row.addWidget(b)

    def button(self, act: Act) -> QPushButton | None:
        """The button of ``act`` (tests)."""
        for b in self.findChildren(QPushButton):
            if b.property("act") == act.value:
                return b
        return None

    def notify(self, title: str, message: str) -> None:
        self.status.setText(f"{title}: {message}\n\n{self.status.text()}")

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.has_tray:
            return  # accepted: hidden, the tray stays
        event.ignore()
        self.triggered.emit(Act.QUIT)
