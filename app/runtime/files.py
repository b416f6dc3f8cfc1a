"""The runtime folder's files: one builder at a time, JSON state files, and trees to remove.

Contract: :class:`PidLock` is an exclusive lock file holding its holder's pid, for processes and
threads alike (it is not re-entrant).  A lock file whose process is gone is taken over; while
the file is being written, or without psutil to ask, its holder counts as alive.  Waiting
longer than ``wait`` seconds raises what :meth:`PidLock.busy` makes (a subclass names the
work that holds the lock).  :func:`read_json` is ``{}`` for a missing, unreadable or non-object
file; :func:`write_json` replaces a file at once (a temporary file, then ``os.replace``);
:func:`remove_tree` removes a folder, files Windows marked read-only too, and does nothing when
it is missing.

No torch, no Qt: the frozen tray imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


class PidLock:
    """One holder per lock file across processes: an exclusive file holding the holder's pid.
    A lock file whose process is gone is taken over."""

    def __init__(self, path: Path, wait: float = 5.0) -> None:
        self.path, self.wait = path, wait
        self.fd: int | None = None

    def busy(self) -> Exception:
        """What waiting longer than ``wait`` raises."""
        return TimeoutError(f"another process holds {self.path}")

    def __enter__(self) -> PidLock:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                os.write(self.fd, str(os.getpid()).encode())
                return self
            except FileExistsError:
                if not _holder_alive(self.path):
                    self.path.unlink(missing_ok=True)
                    continue
                if time.monotonic() > deadline:
                    raise self.busy() from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)


def _holder_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return True  # being written this instant: look again after a moment
    if pid == os.getpid():
        return True  # another thread of this process
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        return True


def remove_tree(path: Path) -> None:
    if not path.exists():
        return

    def writable(func, p, _exc):  # noqa: ANN001 - Windows marks some files read-only
        os.chmod(p, 0o700)
        func(p)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable)
    else:
        shutil.rmtree(path, onerror=writable)


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
