"""`molink app`: the tray app's entry point (one instance per user) and ``--selftest``.

Contract
--------
``main(args)`` (``args.selftest``, ``args.background``, ``args.link``) returns the exit code.
One instance per user: a second launch (or a ``molink://`` link opened by the OS) hands its
request to the running instance (``show``, ``open <link>``, ``quit``) and exits 0; the first
one makes the :class:`~app.desktop.desktop.Desktop` (the controller wired to the tray, the
dialogs and the chat window).  ``--selftest`` runs :func:`app.desktop.selftest.run` (offscreen, no user).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from PySide6.QtWidgets import QApplication

from . import icons
from .controller import Controller
from .desktop import Desktop
from .settings import Paths, Settings
from .state import Sharing
from .supervisor import LOG_ROTATE_BYTES


def _streams(logs_dir: Path) -> None:
    """A windowed build has no stdout/stderr (None): give them a file so nothing crashes writing."""
    if sys.stdout is None or sys.stderr is None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        f = open(logs_dir / "app-console.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - for the process's lifetime
        sys.stdout = sys.stdout or f
        sys.stderr = sys.stderr or f


def _logging(logs_dir: Path) -> None:
    logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        logs_dir / "app.log", maxBytes=LOG_ROTATE_BYTES, backupCount=1, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("molink")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(args) -> int:  # noqa: ANN001 - argparse.Namespace from app.cli
    if getattr(args, "selftest", False):
        from .selftest import run

        return run()
    paths = Paths.default()
    _streams(paths.logs_dir)
    _logging(paths.logs_dir)
    existing = QApplication.instance()
    app = existing if isinstance(existing, QApplication) else QApplication(sys.argv[:1])
    app.setApplicationName("MoLink")
    app.setWindowIcon(icons.app_icon())
    app.setQuitOnLastWindowClosed(False)
    from .system.single_instance import SingleInstance, default_name

    instance = SingleInstance(default_name(), paths.config_dir)
    link = getattr(args, "link", None)
    if not instance.acquire():
        sent = instance.send(f"open {link}" if link else "show")
        if not sent:
            print("molink: another MoLink app is starting or not answering; try again in a moment", file=sys.stderr)
            return 1
        return 0
    return run_app(app, paths, instance, link, getattr(args, "background", False))


def run_app(app: QApplication, paths: Paths, instance, link: str | None, background: bool) -> int:  # noqa: ANN001
    from .settings import load
    from .system.autostart import for_this_os
    from .system.secrets import SecretStore

    settings: Settings = load(paths)
    controller = Controller(paths, settings)  # frozen: engine children run from the per-user runtime
    secrets = SecretStore(paths.config_dir)
    autostart = for_this_os([*_app_command(), "--background"])
    desk = Desktop(controller, secrets, autostart)
    instance.message_received.connect(desk.on_message)
    desk.show(background)
    if link:
        desk.on_message(f"open {link}")
    elif settings.share_on_start and controller.joined() is not None and controller.sharing is Sharing.OFF:
        controller.set_sharing(True)
    elif not background and not settings.first_run_done:
        desk.welcome()
    if settings.run_relay:
        controller.set_relaying(True)
    if secrets.warning:
        desk._notify("MoLink", secrets.warning)
    return app.exec()


def _app_command() -> list[str]:
    """How the OS starts this app (autostart, links)."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "app.cli", "app"]
