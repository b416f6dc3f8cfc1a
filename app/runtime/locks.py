"""Runtime lock files and the choice of backend for a machine (pure; no torch, no Qt, no I/O but reading a lock).

Contract
--------
* :data:`BACKENDS` lists the torch builds MoLink knows (newest CUDA first, the CPU last) with the
  oldest NVIDIA driver (per OS) and GPU architecture each one runs on.
* :func:`choose_backend` picks, from NVML's GPUs (:func:`worker_core.gpus.list_gpus`), the newest
  backend for which a lock is shipped and that the driver and every GPU support; otherwise the CPU,
  always with a one-sentence reason.
* :class:`Lock` is one lock file parsed once (:meth:`Lock.parse`): a header written by
  :func:`header` (backend, OS, Python request, managed or system Python, uv's ``--torch-backend``)
  above ``uv pip compile --generate-hashes`` output, and the sha256 of the whole file (a changed
  file means a new runtime).  ``installer/locks.py`` writes them; :mod:`app.runtime.build` builds from them.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOCK_MAGIC = "# molink runtime lock v1"


class RuntimeProblem(Exception):
    """Base of the runtime's errors: one sentence for the user."""


class LockError(RuntimeProblem):
    """A lock file that is missing, unreadable or not a MoLink runtime lock."""


@dataclass(frozen=True)
class Backend:
    name: str  # lock file name part: "cpu", "cu130"
    cuda: tuple[int, int] | None  # CUDA toolkit of the torch build; None: CPU
    min_driver: dict[str, tuple[int, ...]] = field(default_factory=dict)  # os -> NVIDIA driver at least
    min_compute: tuple[int, int] | None = None  # oldest GPU architecture the build has kernels for
    min_free_gb: float = 3.0  # free disk space a build needs (download + install), GB


# Newest first.  Drivers: NVIDIA's CUDA toolkit release notes, "CUDA Toolkit and Corresponding Driver
# Versions" (the GA driver of each toolkit).  Compute capabilities: the PyTorch release notes (CUDA 12.8
# builds from 2.8 on have no Maxwell/Pascal kernels; CUDA 13 has none below Turing).  Check both for
# every new torch pin.
BACKENDS: tuple[Backend, ...] = (
    Backend("cu130", (13, 0), {"linux": (580, 65, 6), "windows": (580, 88)}, (7, 5), 12.0),
    Backend("cu128", (12, 8), {"linux": (570, 26), "windows": (570, 65)}, (7, 0), 12.0),
    Backend("cu126", (12, 6), {"linux": (560, 28, 3), "windows": (560, 76)}, (5, 0), 12.0),
    Backend("cpu", None, {}, None, 3.0),
)
BACKEND = {b.name: b for b in BACKENDS}


def os_tag(platform: str | None = None) -> str:
    platform = platform or sys.platform
    return "windows" if platform == "win32" else "macos" if platform == "darwin" else "linux"


def parse_version(text: str) -> tuple[int, ...]:
    """ "555.42.02" -> (555, 42, 2); "8.6" -> (8, 6); anything unreadable -> ()."""
    parts = re.findall(r"\d+", text or "")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str  # one sentence for the progress dialog and the log


def choose_backend(
    gpus: Sequence, available: Iterable[str], os_name: str
) -> Choice:  # gpus: [worker_core.gpus.GpuInfo]
    """The newest shipped CUDA backend that every GPU and the driver support, else the CPU."""
    available = set(available)
    if not gpus:
        return Choice("cpu", "no NVIDIA GPU found: the engine computes on the CPU")
    driver = parse_version(gpus[0].driver)
    compute = min(parse_version(g.compute_capability) for g in gpus)
    refused = []
    for b in BACKENDS:
        if b.cuda is None or b.name not in available:
            continue
        need = b.min_driver.get(os_name)
        if need is None or not driver or driver < need:
            refused.append(f"{b.name} needs driver {'.'.join(map(str, need or ()))}+")
            continue
        if b.min_compute and compute < b.min_compute:
            refused.append(f"{b.name} needs compute capability {'.'.join(map(str, b.min_compute))}+")
            continue
        names = ", ".join(sorted({g.name for g in gpus}))
        return Choice(b.name, f"{names} (driver {gpus[0].driver}): CUDA {b.cuda[0]}.{b.cuda[1]} build")
    why = "; ".join(refused) if refused else "no CUDA runtime is shipped for this system"
    return Choice(
        "cpu", f"GPU found but no CUDA build fits (driver {gpus[0].driver}; {why}): the engine computes on the CPU"
    )


@dataclass(frozen=True)
class Lock:
    path: Path
    sha256: str  # of the file's bytes: a change means a new runtime
    backend: str  # a BACKEND name
    os: str  # linux | windows | macos
    python: str  # what `uv venv --python` gets: "3.12", or an interpreter path (local locks)
    managed_python: bool  # True: uv's own Python builds only (downloaded once); False: a Python on this system
    torch_backend: str | None  # uv --torch-backend for the PyTorch packages (None: the lock's own index lines)

    @classmethod
    def parse(cls, path: Path) -> Lock:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LockError(f"cannot read the runtime lock {path}: {e.strerror or e}") from None
        text = data.decode("utf-8", errors="replace")
        lines = text.splitlines()
        if not lines or lines[0].strip() != LOCK_MAGIC:
            raise LockError(f"{path.name} is not a MoLink runtime lock (first line {LOCK_MAGIC!r} missing)")
        meta: dict[str, str] = {}
        for line in lines[1:]:
            m = re.match(r"#\s*([a-z-]+):\s*(.*?)\s*$", line)
            if not line.startswith("#"):
                break
            if m:
                meta[m.group(1)] = m.group(2)
        for key in ("backend", "os", "python", "python-source"):
            if not meta.get(key):
                raise LockError(f"{path.name}: header field {key!r} missing")
        if meta["backend"] not in BACKEND:
            raise LockError(f"{path.name}: unknown backend {meta['backend']!r}")
        if meta["python-source"] not in ("managed", "system"):
            raise LockError(f"{path.name}: python-source must be managed or system")
        if "--hash=sha256:" not in text:
            raise LockError(f"{path.name} carries no hashes")
        return cls(
            path,
            hashlib.sha256(data).hexdigest(),
            meta["backend"],
            meta["os"],
            meta["python"],
            meta["python-source"] == "managed",
            meta.get("torch-backend") or None,
        )


def header(backend: str, os_name: str, python: str, managed: bool, torch_backend: str | None, made_by: str) -> str:
    """The header ``installer/locks.py`` writes above uv's output (the format :meth:`Lock.parse` reads)."""
    lines = [
        LOCK_MAGIC,
        f"# backend: {backend}",
        f"# os: {os_name}",
        f"# python: {python}",
        f"# python-source: {'managed' if managed else 'system'}",
    ]
    if torch_backend:
        lines.append(f"# torch-backend: {torch_backend}")
    lines.append(f"# made by: {made_by}")
    return "\n".join(lines) + "\n"
