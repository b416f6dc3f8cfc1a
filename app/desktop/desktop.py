"""The app as the user sees it: the controller wired to the tray (or the window where there is
no tray), the dialogs and the chat window.

Contract: :class:`Desktop` (controller, secret store, autostart; for tests also ``use_tray``,
``confirm`` and ``exit_app``) shows the tray or the window, and each
:class:`~app.desktop.state.Act` has one handler here; messages from a second launch (``show``,
``open <link>``, ``quit``) arrive at :meth:`Desktop.on_message`.  :mod:`app.desktop.main` makes
one at start, :mod:`app.desktop.selftest` makes one offscreen.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import TypeVar, cast

from PySide6.QtCore import QObject, QTimer, QUrl
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import QApplication, QMessageBox, QSystemTrayIcon, QWidget
from shiboken6 import isValid

from app.group import links

from .background import Background
from .controller import STOP_GRACE, Controller
from .state import Act, Sharing
from .tray import MainWindow, TrayView

Dialog = TypeVar("Dialog", bound=QWidget)

log = logging.getLogger("molink.app")

QUIT_DEADLINE_MS = int((STOP_GRACE + 10) * 1000)  # quit even if a child ignores its stop
TRAY_RECHECK_MS = 5000  # window mode looks for a tray once more after this
NO_TRAY_NOTE = (
    "Your desktop shows no tray icons, so MoLink runs in this window. On GNOME, the AppIndicator "
    "extension adds a tray; closing this window quits MoLink."
)


class Desktop(QObject):
    """The app: controller + tray or window + dialogs + chat window."""

    def __init__(
        self,
        controller: Controller,
        secrets=None,  # noqa: ANN001 - SecretStore
        autostart=None,  # noqa: ANN001 - Autostart
        use_tray: bool | None = None,
        confirm: Callable[[str], bool] | None = None,
        exit_app: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        # exit(), not quit(): Qt 6's quit() first asks every window to close, and the main
        # window answers a close by asking to quit (window mode), which would cancel it.
        # Tests pass their own: an exit() outside exec() makes the next event loop return at once.
        self.exit_app = exit_app or (lambda: QApplication.exit(0))
        self.c = controller
        self.secrets = secrets
        self.autostart = autostart
        self.confirm = confirm or _ask
        self.use_tray = QSystemTrayIcon.isSystemTrayAvailable() if use_tray is None else use_tray
        self.tray: TrayView | None = None
        self.window: MainWindow | None = None
        if self.use_tray:
            self.tray = TrayView(controller.snapshot, self)
            self.tray.triggered.connect(self.handle)
        else:
            self.window = MainWindow(controller.snapshot, NO_TRAY_NOTE)
            self.window.triggered.connect(self.handle)
            if use_tray is None:  # the tray host may start after us (a login session): look again
                QTimer.singleShot(TRAY_RECHECK_MS, self._late_tray)
        controller.changed.connect(self._refresh)
        controller.notify.connect(self._notify)
        controller.quit_ready.connect(self._quit_now)
        controller.master_ready.connect(lambda _info: self.offer_firewall_rule())
        controller.relay_ready.connect(lambda _port: self.offer_firewall_rule())
        self.dialogs: dict[str, QWidget] = {}
        self.chat = None  # ChatWindow, made on first use
        self._quitting = False
        self._quit_done = False
        # quit even if a child ignores its stop; owned here, stopped once the app quits (a timer left
        # running would call _quit_now again, on windows deleted by then)
        self._deadline = QTimer(self)
        self._deadline.setSingleShot(True)
        self._deadline.timeout.connect(self._quit_now)

    def offer_firewall_rule(self, platform: str = sys.platform) -> None:
        """Windows: when this PC listens on a port of the app's that was never asked about (the
        group port, the relay's), ask to let friends reach them through the firewall (or, allowed
        before, just rewrite the rule) and write the rule off the Qt thread (one UAC prompt); the
        ports asked about and the answer are remembered either way."""
        from .system import firewall

        hosted = self.c.master_info if self.c.hosting() else None
        needed = firewall.inbound_ports(
            self.c.settings.group_host, (hosted or {}).get("group_port"), self.c.relay_port if self.c.relay else None
        )
        action = firewall.decide(platform, needed, self.c.settings.firewall_ports, self.c.settings.firewall_allowed)
        if action is firewall.Action.NONE:
            return
        ports = sorted({*needed, *self.c.settings.firewall_ports})[-firewall.MAX_PORTS :]
        if action is firewall.Action.ASK:
            allowed = self.confirm(firewall.question(needed))
            self.c.remember(firewall_ports=ports, firewall_allowed=allowed)
            if not allowed:
                return
        else:
            self.c.remember(firewall_ports=ports)

        async def write() -> str:
            return await asyncio.to_thread(firewall.write_rule, needed)

        self._firewall = Background(write, firewall.ELEVATED_TIMEOUT + 10)
        self._firewall.done.connect(
            lambda why: self._notify("MoLink", why or firewall.UPDATED.format(ports=firewall.describe(needed)))
        )
        self._firewall.failed.connect(lambda why: self._notify("MoLink: the firewall rule was not written", why))
        self._firewall.start()

    def _late_tray(self) -> None:
        if self.tray is not None or not QSystemTrayIcon.isSystemTrayAvailable():
            return
        self.tray = TrayView(self.c.snapshot, self)
        self.tray.triggered.connect(self.handle)
        self.tray.show()
        if self.window is not None:
            self.window.has_tray = True  # closing the window now only hides it

    def show(self, background: bool = False) -> None:
        if self.tray is not None:
            self.tray.show()
        elif self.window is not None and not background:
            self.window.show()

    def _refresh(self) -> None:
        if self.tray is not None:
            self.tray.refresh()
        if self.window is not None:
            self.window.refresh()

    def _notify(self, title: str, message: str) -> None:
        """Tell the user through the tray or the window, if it still exists (background work,
        e.g. the firewall rule, may answer after the view was destroyed on quitting)."""
        view = self.tray or self.window
        if view is not None and isValid(view):
            view.notify(title, message)

    # ------------------------------------------------------------------ commands
    def handle(self, act: Act) -> None:
        c = self.c
        s = c.snapshot()
        if act is Act.SHARE:
            c.set_sharing(s.sharing in (Sharing.OFF, Sharing.PAUSED))
        elif act is Act.PAUSE_HOUR:
            c.pause(3600.0)
        elif act is Act.PAUSE_UNTIL_RESUMED:
            c.pause(None)
        elif act is Act.RESUME:
            c.resume()
        elif act is Act.KEEP_SHARING:
            c.keep_sharing()
        elif act is Act.FINISH:
            c.finish()
        elif act is Act.CREATE_GROUP:
            self.open_create()
        elif act is Act.SHOW_CODE:
            from .dialogs import ShowCodeDialog

            self._dialog("code", lambda: ShowCodeDialog(c))
        elif act is Act.STOP_GROUP:
            if self._confirm_group_stop("Stop the group on this PC?"):
                c.stop_group()
        elif act is Act.JOIN_GROUP:
            self.open_join(None)
        elif act is Act.OPEN_CHAT:
            self.open_chat()
        elif act is Act.OPEN_DASHBOARD:
            url = c.dashboard_url()
            if url:
                QDesktopServices.openUrl(QUrl(url))
        elif act is Act.COPY_API:
            base = c.api_base()
            if base:
                QGuiApplication.clipboard().setText(base + "/v1")
        elif act is Act.SETTINGS:
            from .dialogs import SettingsDialog

            self._dialog("settings", lambda: SettingsDialog(c, self.secrets, self.autostart))
        elif act is Act.RELAY:
            c.set_relaying(not s.relaying)
        elif act is Act.OPEN_LOGS:
            c.paths.logs_dir.mkdir(parents=True, exist_ok=True)
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(c.paths.logs_dir)))
        elif act is Act.QUIT and self._confirm_group_stop("Quit MoLink? The group on this PC stops for everyone."):
            self.quit()

    def _confirm_group_stop(self, question: str) -> bool:
        s = self.c.snapshot()
        others = (s.members_online or 0) - (1 if s.sharing in (Sharing.SHARING, Sharing.STARTING) else 0)
        return not s.hosting or others <= 0 or self.confirm(question + f" ({others} other PC(s) are connected.)")

    def _dialog(self, key: str, make: Callable[[], Dialog]) -> Dialog:
        """The open dialog of this kind (raised), or a new one from ``make``."""
        d = self.dialogs.get(key)
        if d is None or not d.isVisible():
            d = make()
            self.dialogs[key] = d
        d.show()
        d.raise_()
        d.activateWindow()
        return cast(Dialog, d)  # the dialog under ``key`` is always what ``make`` builds

    def welcome(self):  # noqa: ANN201
        """The first-run dialog; remembered as done whatever the user picks."""
        from .dialogs import WelcomeDialog
        from .settings import save

        d = self._dialog("welcome", WelcomeDialog)
        d.chosen.connect(
            lambda what: self.open_join(None) if what == "join" else self.open_create() if what == "create" else None
        )
        self.c.settings.first_run_done = True
        try:
            save(self.c.paths, self.c.settings)
        except OSError as e:
            log.warning("cannot save settings: %s", e)
        return d

    def open_create(self):  # noqa: ANN201
        from .dialogs import CreateGroupDialog

        return self._dialog("create", lambda: CreateGroupDialog(self.c))

    def open_join(self, link: links.JoinLink | None):  # noqa: ANN201
        from .join_dialog import JoinDialog

        old = self.dialogs.get("join")
        if link is not None and old is not None and old.isVisible():
            old.close()  # a link opened now fills a new dialog, not the one already open
        d = self._dialog("join", lambda: JoinDialog(self.c, link))
        if link is None:
            d.look_for_masters()
        return d

    def chat_target(self):  # noqa: ANN201 - ChatTarget | None
        from .chat_text import ChatTarget

        remote = self.c.settings.chat_master.strip()
        if remote:
            key = self.secrets.get("chat-api-key") if self.secrets is not None else None
            return ChatTarget(remote if "://" in remote else f"http://{remote}", key or None)
        base = self.c.api_base()
        return ChatTarget(base) if base else None

    def open_chat(self):  # noqa: ANN201
        from .chat import ChatWindow

        if self.chat is None:
            self.chat = ChatWindow(self.chat_target())
            self.chat.target_changed.connect(self._chat_target_changed)
        else:
            target = self.chat_target()
            if target is not None:
                self.chat.set_target(target)
        self.chat.show()
        self.chat.raise_()
        self.chat.activateWindow()
        return self.chat

    def _chat_target_changed(self, target) -> None:  # noqa: ANN001 - ChatTarget
        self.c.settings.chat_master = target.base_url
        if self.secrets is not None:
            self.secrets.set("chat-api-key", target.api_key) if target.api_key else self.secrets.delete("chat-api-key")
        from .settings import save

        try:
            save(self.c.paths, self.c.settings)
        except OSError as e:
            log.warning("cannot save settings: %s", e)

    # ------------------------------------------------------------------ messages from a second launch
    def on_message(self, message: str) -> None:
        if message == "quit":
            self.quit()
        elif message.startswith("open "):
            try:
                self.open_join(links.parse_link(message[5:].strip()))
            except ValueError as e:
                self._notify("MoLink cannot open that link", str(e))
        elif self.window is not None:  # "show": a second launch brings the app forward
            self.window.show()
            self.window.raise_()
        elif self.c.joined() is None and not self.c.hosting():
            self.open_join(None)
        else:
            self.open_chat()

    # ------------------------------------------------------------------ quitting
    def quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        self._deadline.start(QUIT_DEADLINE_MS)
        self.c.quit()

    def _quit_now(self) -> None:
        """Hide everything and leave the event loop, once (the children stopped, or the deadline)."""
        self._deadline.stop()
        if self._quit_done:
            return
        self._quit_done = True
        if self.tray is not None:
            self.tray.hide()
        if self.window is not None:
            self.window.hide()
        self.exit_app()


def _ask(question: str) -> bool:
    return QMessageBox.question(None, "MoLink", question) == QMessageBox.StandardButton.Yes
