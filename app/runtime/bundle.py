"""What an installed app brings to its engine runtime: the bundle to build it from, and a clean
environment for every child it starts.

Contract: a :class:`Bundle` is the ``uv`` binary, the lock files and the ``molink`` wheel the
frozen app ships in its ``runtime/`` folder (:meth:`Bundle.default`; from a source checkout
``build/runtime``, with the uv of this Python, :func:`source_uv`).  :meth:`Bundle.locks` reads
this OS's locks (:mod:`app.runtime.locks`), logging and leaving out a file that does not parse;
the wheel's hash is computed once per file version.  :func:`child_env` is the environment for
uv and the runtime's Python: without the frozen app's library path, an activated venv or
``PYTHONPATH``, with plain UTF-8 output; :func:`scrub_library_path` makes it this process's own
(for a frozen entry point, before it starts anything).

No torch, no Qt: the frozen tray and launcher import this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .locks import Lock, LockError, os_tag

log = logging.getLogger("molink.runtime")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """What the installed app ships for building runtimes."""

    uv: Path
    locks_dir: Path
    wheel: Path | None  # the molink wheel (None: the locks already carry the engine, tests only)

    @classmethod
    def default(cls) -> Bundle:
        """The frozen app's ``runtime/`` folder; from a source checkout, ``build/runtime`` and the uv of this Python."""
        meipass = getattr(sys, "_MEIPASS", None)
        if getattr(sys, "frozen", False) and meipass:
            return cls.at(Path(meipass) / "runtime")
        return cls.at(Path(__file__).resolve().parents[2] / "build" / "runtime")

    @classmethod
    def at(cls, folder: Path) -> Bundle:
        """``folder/uv`` (else the source checkout's uv), ``folder/locks/*.lock``, ``folder/molink-*.whl``."""
        uv = folder / ("uv.exe" if sys.platform == "win32" else "uv")
        return cls(uv if uv.exists() else source_uv(), folder / "locks", _one_wheel(folder))

    def locks(self, os_name: str | None = None) -> dict[str, Lock]:
        """Backend name -> lock, for this OS; files that do not parse are logged and left out."""
        os_name = os_name or os_tag()
        out: dict[str, Lock] = {}
        for path in sorted(self.locks_dir.glob("*.lock")) if self.locks_dir.is_dir() else []:
            try:
                lock = Lock.parse(path)
            except LockError as e:
                log.warning("%s", e)
                continue
            if lock.os == os_name:
                out[lock.backend] = lock
        return out

    def wheel_sha256(self) -> str | None:
        return _wheel_hash(self.wheel) if self.wheel else None


_WHEEL_HASHES: dict[tuple[str, int, int], str] = {}


def _wheel_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _WHEEL_HASHES:
        _WHEEL_HASHES[key] = _sha256(path)
    return _WHEEL_HASHES[key]


def _one_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("molink-*.whl")) if folder.is_dir() else []
    return wheels[-1] if wheels else None


def source_uv() -> Path:
    """uv for a source checkout: the ``uv`` package's binary, else the one on PATH."""
    try:
        import uv

        return Path(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        return Path(found) if found else Path("uv")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for uv and the runtime's Python: without the frozen app's library path.

    PyInstaller's bootloader points ``LD_LIBRARY_PATH`` at the bundle and keeps the original in
    ``LD_LIBRARY_PATH_ORIG``; a child that inherited it would load the bundle's libraries."""
    env = dict(os.environ)
    for var in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"):
        orig = env.pop(var + "_ORIG", None)
        if getattr(sys, "frozen", False):
            if orig is not None:
                env[var] = orig
            else:
                env.pop(var, None)
    env.pop("VIRTUAL_ENV", None)  # uv must target the runtime, never an activated venv
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    env["NO_COLOR"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra or {})
    return env


def scrub_library_path() -> None:
    """For a frozen app's entry point: every child it starts from now on gets :func:`child_env`'s
    library path (the loader of this process read its own at startup and keeps it)."""
    env = child_env()
    for var in ("LD_LIBRARY_PATH", "LD_LIBRARY_PATH_ORIG", "DYLD_LIBRARY_PATH", "DYLD_LIBRARY_PATH_ORIG"):
        if var in env:
            os.environ[var] = env[var]
        else:
            os.environ.pop(var, None)
