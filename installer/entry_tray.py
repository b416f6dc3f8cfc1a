"""`molink-tray` in an installed (frozen) MoLink: the windowed tray app.

Contract: ``molink-tray [--background] [molink://link]`` is ``molink app ...`` (:mod:`app.desktop.main`).
``molink-tray --quit`` asks a running tray of this user to quit (its single-instance channel) and
waits, at most ``QUIT_WAIT`` seconds, until it has stopped its engine children and released its
lock; exit 0 when no tray runs any more, 1 otherwise.  The installers call it before replacing or
removing files.  Engine children never inherit the frozen app's library path (:func:`app.runtime.bundle.child_env`).
"""

import multiprocessing
import sys
import time

QUIT_WAIT = 60.0  # seconds: the tray gives its children 30 s to leave the group gracefully


def quit_running() -> int:
    from PySide6.QtCore import QCoreApplication, QLockFile

    from app.desktop.settings import Paths
    from app.desktop.system.single_instance import SingleInstance, default_name

    app = QCoreApplication.instance() or QCoreApplication(sys.argv[:1])  # local sockets need one
    name, folder = default_name(), Paths.default().config_dir
    if not folder.is_dir():
        return 0  # never started for this user
    lock = QLockFile(str(folder / f"{name}.lock"))
    lock.setStaleLockTime(0)  # the running tray's own setting: only a dead owner makes it stale
    if lock.tryLock(0):
        lock.unlock()
        return 0  # no tray runs
    SingleInstance(name, folder).send("quit", timeout_ms=3000)
    deadline = time.monotonic() + QUIT_WAIT
    while time.monotonic() < deadline:
        app.processEvents()
        if lock.tryLock(0):
            lock.unlock()
            return 0
        time.sleep(0.25)
    return 1


def main() -> int:
    from app.runtime.bundle import scrub_library_path

    scrub_library_path()
    argv = sys.argv[1:]
    if argv == ["--quit"]:
        return quit_running()
    from app.cli import main as cli_main

    return cli_main(["app", *argv])


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
