"""The first "Share my GPU" of an installed app: the engine runtime is built, in its progress dialog,
before any engine child starts, and the worker then runs from the runtime's interpreter; a failed
build says why and starts nothing; a cancelled build leaves no half state (nothing saved, nothing
running, nothing marked ready) and the next try resumes it.

The installed app is simulated: ``sys.frozen`` is set, and ``Runtime.default()`` is a runtime in
``tmp_path`` built by the fake uv of ``test_runtime.py``, whose environment's "python" answers the
runtime's import check and otherwise runs a fake worker that records how it was started and speaks
the control protocol.  Everything else is the real code path: the tray's Share action, the
controller's default ``engine_ready`` (``ensure_runtime``), the dialog, ``Runtime.ensure`` with its
subprocesses, ``app.proc.spawn.engine_command`` and the Supervisor.
"""

import json
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
from test_runtime import PROBE_JSON, Fake, posix_only

from app.desktop.controller import Controller
from app.desktop.desktop import Desktop
from app.desktop.runtime_dialog import RuntimeDialog
from app.desktop.settings import Paths, Settings, load
from app.desktop.state import Act, Sharing
from app.runtime import build as rtm
from app.runtime.build import MARKER, RuntimeNotReady, State
from worker_core.pairing import JoinedGroup

pytestmark = posix_only

WAIT = 20_000  # ms: the fake build and the fake worker take well under a second

# the runtime's "python" when it is started as an engine (`<python> -m app.cli worker ...`)
FAKE_ENGINE = textwrap.dedent(
    """
    import json, os, sys
    record = os.environ["FIRST_RUN_RECORD"]
    root = os.environ["FIRST_RUN_ROOT"]
    with open(record, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "ready": os.path.exists(os.path.join(root, "runtime.json"))}) + "\\n")
    def ev(**kw):
        print("@molink " + json.dumps(kw), flush=True)
    ev(event="connecting", master="x:1"); ev(event="connected", master="x:1")
    ev(event="serving", layers=[0, 4], num_layers=4, epoch=1)
    for line in sys.stdin:
        break  # stop or finish
    ev(event="left")
    """
)


class Installed:
    """A frozen app whose per-user runtime is built by the fake uv into ``tmp_path/rt``."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fake = Fake(tmp_path)
        self.rt = self.fake.rt
        engine = tmp_path / "fake_engine.py"
        engine.write_text(FAKE_ENGINE)
        # the fake environment's python: the import check, else the fake worker ($0 is the python's path)
        (self.fake.dir / "python.sh").write_text(
            f'if [ "$1" = "-c" ]; then echo \'{json.dumps(PROBE_JSON)}\'; exit 0; fi\n'
            f'exec "{sys.executable}" "{engine}" "$0" "$@"\n'
        )
        self.record = tmp_path / "engine-starts.jsonl"
        monkeypatch.setenv("FIRST_RUN_RECORD", str(self.record))
        monkeypatch.setenv("FIRST_RUN_ROOT", str(self.rt.root))
        monkeypatch.setattr(sys, "frozen", True, raising=False)
        monkeypatch.setattr(rtm.Runtime, "default", classmethod(lambda cls: self.rt))

    def starts(self) -> list[dict]:
        """How the engine was started so far: its argv (the interpreter first) and whether the runtime was ready."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


class Watcher:
    """Looks at the runtime dialog while its modal loop runs (every 20 ms): a snapshot of what the
    user sees at each look, and ``act(dialog)`` to press its buttons."""

    def __init__(self, c: Controller, act: Callable[[RuntimeDialog], None] | None = None) -> None:
        self.c, self.act = c, act
        self.seen: list[dict] = []
        self.most_open = 0
        self.timer = QTimer()
        self.timer.setInterval(20)
        self.timer.timeout.connect(self._look)

    def __enter__(self) -> "Watcher":
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.stop()

    def _look(self) -> None:
        dialogs = [w for w in QApplication.topLevelWidgets() if isinstance(w, RuntimeDialog) and w.isVisible()]
        self.most_open = max(self.most_open, len(dialogs))
        if not dialogs:
            return
        d = dialogs[0]
        self.seen.append(
            {
                "title": d.windowTitle(),
                "modal": d.isModal(),
                "bar": d.bar.value(),
                "line": d.line.text(),
                "headline": d.headline.text(),
                "error": d.error,
                "style": d.line.styleSheet(),
                "retry": not d.retry_button.isHidden(),
                "no_worker": self.c.worker is None,
                "sharing": self.c.sharing,
            }
        )
        for extra in dialogs[1:]:  # a second dialog would be a bug: end it so the test fails instead of hanging
            extra.cancel()
        if self.act is not None:
            self.act(d)


def _controller(tmp_path: Path, settings: Settings | None = None) -> tuple[Controller, Desktop]:
    paths = Paths.under(tmp_path / "me")
    JoinedGroup("Friends", "me", "127.0.0.1", 7733, "cert").save(paths.worker_dir)
    c = Controller(paths, settings or Settings(), gpu="test", probe_load=lambda pids: None)
    d = Desktop(c, use_tray=False, confirm=lambda q: True, exit_app=lambda: None)
    return c, d


@pytest.fixture
def cleanup(qtbot):
    made: list[tuple[Controller, Desktop]] = []
    yield made
    for c, d in made:
        if c.worker is not None:
            c.worker.stop("stop", 5)
            assert c.worker.wait_stopped(10_000)
        c.changed.disconnect()
        if d.window is not None:
            d.window.deleteLater()


def _once(flag: dict, key: str) -> bool:
    """True the first time ``key`` is asked for."""
    first = key not in flag
    flag[key] = True
    return first


def test_the_first_share_builds_the_runtime_in_the_dialog_then_starts_the_worker_from_it(
    qtbot, tmp_path, monkeypatch, cleanup
):
    app = Installed(tmp_path, monkeypatch)
    app.fake.behave(hang="-r")  # the download waits until the test has seen the dialog
    c, desk = _controller(tmp_path)
    cleanup.append((c, desk))
    assert c.sharing is Sharing.OFF
    with pytest.raises(RuntimeNotReady):  # nothing can start an engine yet
        rtm.runtime_python()

    def act(d: RuntimeDialog) -> None:
        if "Downloading torch" in d.line.text():
            (app.fake.dir / "go").touch()

    with Watcher(c, act) as w:
        desk.handle(Act.SHARE)  # the tray's "Share my GPU": returns once the dialog closed
    assert w.seen, "no runtime dialog was shown"
    assert w.most_open == 1
    assert all(s["title"] == "MoLink: installing the engine" and s["modal"] for s in w.seen)
    downloading = [s for s in w.seen if "Downloading torch" in s["line"]]
    assert downloading and 0 < downloading[0]["bar"] < 1000  # the bar moves with the build
    assert all(s["no_worker"] and s["sharing"] is Sharing.OFF for s in w.seen)  # nothing started meanwhile
    assert app.fake.calls() == ["venv", "pip install -r", "pip install wheel"]
    assert app.rt.state(app.rt.lock_for()) is State.READY

    # the worker starts only now, from the runtime's interpreter, and serves
    assert c.sharing is Sharing.STARTING and c.worker is not None
    assert c.worker.argv[:4] == [str(app.rt.python), "-m", "app.cli", "worker"]
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=WAIT)
    (start,) = app.starts()
    assert start["argv"][:4] == [str(app.rt.python), "-m", "app.cli", "worker"] and start["ready"]
    assert "--supervised" in start["argv"] and str(c.paths.worker_dir) in start["argv"]
    assert load(c.paths).share_on_start

    # off and on again: the runtime is ready, so no dialog and no build
    c.set_sharing(False)
    qtbot.waitUntil(lambda: c.sharing is Sharing.OFF, timeout=WAIT)
    with Watcher(c) as again:
        desk.handle(Act.SHARE)
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=WAIT)
    assert again.seen == [] and app.fake.calls() == [] and len(app.starts()) == 2


def test_a_failed_build_says_why_starts_nothing_and_retry_resumes_it(qtbot, tmp_path, monkeypatch, cleanup):
    app = Installed(tmp_path, monkeypatch)
    app.fake.behave(fail="-r")  # uv cannot download torch
    c, desk = _controller(tmp_path)
    cleanup.append((c, desk))

    def close_on_error(d: RuntimeDialog) -> None:
        if d.error is not None:
            d.cancel_button.click()  # "Close"

    with Watcher(c, close_on_error) as w:
        desk.handle(Act.SHARE)
    failed = [s for s in w.seen if s["error"]]
    assert failed, "the dialog showed no failure"
    f = failed[0]
    assert f["line"] == (
        "Downloading and installing PyTorch and the engine's packages failed: "
        "Failed to download torch (network unreachable) (uv exit code 2)"
    )
    assert "c62828" in f["style"] and f["retry"] and f["headline"].startswith("MoLink could not install its engine")
    # sharing did not start, nothing ran, nothing was remembered
    assert c.sharing is Sharing.OFF and c.worker is None and app.starts() == []
    assert c.problem == "the engine runtime is not installed yet"
    assert not load(c.paths).share_on_start
    assert not (app.rt.root / MARKER).exists() and app.rt.state(app.rt.lock_for()) is State.PARTIAL
    assert app.fake.calls() == ["venv", "pip install -r"]

    # the network is back: Retry in the dialog resumes the build (the environment is kept) and sharing starts
    def retry_when_back(d: RuntimeDialog) -> None:
        if d.error is not None and _once(flags, "retry"):
            app.fake.behave()
            d.retry_button.click()

    flags: dict = {}
    app.fake.behave(fail="-r")
    with Watcher(c, retry_when_back) as w:
        desk.handle(Act.SHARE)
    assert flags == {"retry": True} and w.most_open == 1
    assert app.fake.calls() == ["pip install -r", "pip install -r", "pip install wheel"]  # no new venv
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=WAIT)
    (start,) = app.starts()
    assert start["argv"][0] == str(app.rt.python) and start["ready"] and c.problem is None


def test_a_cancelled_build_leaves_no_half_state_and_the_next_share_resumes(qtbot, tmp_path, monkeypatch, cleanup):
    app = Installed(tmp_path, monkeypatch)
    app.fake.behave(hang="-r")
    c, desk = _controller(tmp_path)
    cleanup.append((c, desk))

    def cancel_while_downloading(d: RuntimeDialog) -> None:
        if "Downloading torch" in d.line.text() and d.cancel_button.isEnabled():
            d.cancel_button.click()

    with Watcher(c, cancel_while_downloading) as w:
        desk.handle(Act.SHARE)
    assert any("Downloading torch" in s["line"] for s in w.seen)
    # the app: not sharing, no child, nothing remembered as if sharing had started
    assert c.sharing is Sharing.OFF and c.worker is None and app.starts() == []
    assert not load(c.paths).share_on_start and c.snapshot().sharing is Sharing.OFF
    # the runtime: not marked ready, the builder's lock released, the hung uv killed
    assert not (app.rt.root / MARKER).exists() and not (app.rt.root / rtm.BUILD_LOCK).exists()
    assert app.rt.state(app.rt.lock_for()) is State.PARTIAL
    with pytest.raises(RuntimeNotReady):
        rtm.runtime_python()
    hung = int((app.fake.dir / "hung.pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(hung) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(hung), "the cancelled uv still runs"
    assert app.fake.calls() == ["venv", "pip install -r"]

    # the next Share resumes: same environment, the download again (from uv's cache), then the worker
    app.fake.behave()
    with Watcher(c) as w:
        desk.handle(Act.SHARE)
    assert w.seen and app.fake.calls() == ["pip install -r", "pip install wheel"]
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=WAIT)
    assert app.starts()[0]["argv"][0] == str(app.rt.python)


def test_a_pause_that_ends_while_the_runtime_is_missing_asks_once_and_never_twice_at_a_time(
    qtbot, tmp_path, monkeypatch, cleanup
):
    """After an update changed the runtime's lock, a timed pause ends: the dialog opens once; the timer
    and the menu asking again while it is open open no second one; cancelled, sharing is off (not a
    pause that asks again every few seconds)."""
    app = Installed(tmp_path, monkeypatch)
    app.fake.behave(hang="-r")
    c, desk = _controller(tmp_path, Settings(paused_until=time.time() - 1, share_on_start=True))
    cleanup.append((c, desk))
    assert c.sharing is Sharing.PAUSED
    real = c.engine_ready
    asked: list[int] = []
    c.engine_ready = lambda: bool(asked.append(1)) or real()

    def ask_again_then_cancel(d: RuntimeDialog) -> None:
        if "Downloading torch" in d.line.text() and _once(flags, "again"):
            c._on_tick()  # the pause timer fires inside the dialog's loop
            c.set_sharing(True)  # and the user clicks Share in the menu
            d.cancel_button.click()

    flags: dict = {}
    with Watcher(c, ask_again_then_cancel) as w:
        c._on_tick()  # the pause is over
    assert flags == {"again": True} and w.most_open == 1 and asked == [1]
    assert c.sharing is Sharing.OFF and c.paused_until is None and c.worker is None
    settings = load(c.paths)
    assert settings.paused_until is None and not settings.share_on_start
    c._on_tick()
    c._on_tick()
    assert asked == [1] and app.starts() == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
