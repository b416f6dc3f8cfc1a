"""The app controller's sharing logic against a fake worker that speaks the control protocol
(fast: no model).  The real engine is exercised in test_desktop_flows.py."""

import math
import sys
import textwrap
import time

import pytest

pytest.importorskip("pytestqt")

from app.desktop.controller import Controller
from app.desktop.settings import Paths, Settings, load
from app.desktop.state import Act, Sharing, menu
from app.desktop.system import autopause
from worker_core.pairing import JoinedGroup

FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    mode = os.environ.get("FAKE_MODE", "ok")
    def ev(**kw):
        print("@molink " + json.dumps(kw), flush=True)
    if mode == "crash":
        print("fake worker: cannot load layers", file=sys.stderr, flush=True)
        sys.exit(5)
    ev(event="connecting", master="x:1"); ev(event="connected", master="x:1")
    ev(event="serving", layers=[3, 9], num_layers=12, epoch=1)
    ev(event="stats", steps=5, tokens=40, tokens_per_s=12.5)
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "finish":
            time.sleep(0.5)  # the requests in flight end
        ev(event="left")
        sys.exit(0)
    ev(event="left")
    """
)


@pytest.fixture
def make(qtbot, tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    made = []

    def build(mode="ok", joined=True, load=None):
        monkeypatch.setenv("FAKE_MODE", mode)
        paths = Paths.under(tmp_path / f"app{len(made)}")
        if joined:
            JoinedGroup("Friends", "me", "127.0.0.1", 7733, "cert").save(paths.worker_dir)
        c = Controller(
            paths,
            Settings(),
            argv=lambda *a: [sys.executable, str(script), *a],
            gpu="test",
            probe_load=lambda pids: load,
        )
        made.append(c)
        return c

    yield build
    for c in made:
        if c.worker is not None:
            c.worker.stop("stop", 5)
            c.worker.wait_stopped(10000)


def test_share_then_stop(qtbot, make):
    c = make()
    c.set_sharing(True)
    assert c.sharing is Sharing.STARTING
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)
    qtbot.waitUntil(lambda: c.snapshot().tokens_per_s == 12.5, timeout=20000)
    s = c.snapshot()
    assert s.layers == (3, 9) and s.num_layers == 12 and s.joined_group == "Friends"
    assert "--supervised" in c.worker.argv and "--data-dir" in c.worker.argv
    c.set_sharing(False)
    assert c.sharing is Sharing.STOPPING
    qtbot.waitUntil(lambda: c.sharing is Sharing.OFF, timeout=20000)
    assert c.snapshot().layers is None and not c.worker.running()
    assert load(c.paths).share_on_start is False


def test_pause_for_an_hour_and_resume(qtbot, make):
    c = make()
    c.set_sharing(True)
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)
    c.pause(3600)
    qtbot.waitUntil(lambda: c.sharing is Sharing.PAUSED, timeout=20000)
    assert abs(c.paused_until - (time.time() + 3600)) < 60
    saved = load(c.paths)
    assert saved.paused_until == c.paused_until and saved.share_on_start  # a restart keeps the pause
    # the pause is over: sharing resumes by itself
    c.paused_until = time.time() - 1
    c._on_tick()
    assert c.sharing is Sharing.STARTING
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)
    c.pause(None)
    qtbot.waitUntil(lambda: c.sharing is Sharing.PAUSED, timeout=20000)
    assert math.isinf(c.paused_until)
    c._on_tick()
    assert c.sharing is Sharing.PAUSED  # until resumed
    c.resume()
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)


def test_finish_waits_for_the_worker(qtbot, make):
    c = make()
    c.set_sharing(True)
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)
    c.finish()
    assert c.sharing is Sharing.FINISHING
    qtbot.waitUntil(lambda: c.sharing is Sharing.OFF, timeout=20000)


def test_a_crashing_worker_is_a_problem_with_its_last_lines_and_is_retried(qtbot, make):
    c = make(mode="crash")
    c.set_sharing(True)
    qtbot.waitUntil(lambda: c.sharing is Sharing.PROBLEM, timeout=20000)
    s = c.snapshot()
    assert "exit code 5" in s.problem and s.last_log == ("fake worker: cannot load layers",)
    assert c.worker.state.value == "waiting"  # a restart is scheduled
    c.set_sharing(False)  # turning it off cancels the retries
    assert c.sharing is Sharing.OFF and c.worker.state.value == "idle"


def test_sharing_needs_a_group(qtbot, make):
    c = make(joined=False)
    c.set_sharing(True)
    assert c.sharing is Sharing.OFF and c.worker is None


def test_auto_pause_warns_pauses_and_resumes(qtbot, make):
    busy = autopause.GpuLoad(utilization=95, foreign_processes=1, foreign_memory=1 << 30, fullscreen=False)
    c = make(load=busy)
    c.settings.auto_pause = True
    c.policy = autopause.AutoPause(warn_seconds=0.2, clear_seconds=0.2)
    c.set_sharing(True)
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)
    notes = []
    c.notify.connect(lambda title, msg: notes.append(title))
    c._on_tick()
    assert c.snapshot().pause_warning and Act.KEEP_SHARING in [
        getattr(i, "act", None) for i in menu(c.snapshot(), time.time())
    ]
    time.sleep(0.3)
    c._on_tick()
    qtbot.waitUntil(lambda: c.sharing is Sharing.PAUSED, timeout=20000)
    assert notes == ["MoLink will pause sharing in 60 s", "MoLink paused sharing"]
    c._probe_load = lambda pids: autopause.GpuLoad(
        utilization=3, foreign_processes=0, foreign_memory=0, fullscreen=False
    )
    c._on_tick()
    time.sleep(0.3)
    c._on_tick()
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)


def test_keep_sharing_and_manual_pause_win_over_automation(qtbot, make):
    busy = autopause.GpuLoad(utilization=95, foreign_processes=1, foreign_memory=1 << 30, fullscreen=False)
    c = make(load=busy)
    c.settings.auto_pause = True
    c.policy = autopause.AutoPause(warn_seconds=0.2, clear_seconds=0.2)
    c.set_sharing(True)
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=20000)
    c._on_tick()
    c.keep_sharing()
    time.sleep(0.3)
    c._on_tick()
    assert c.sharing is Sharing.SHARING  # the user said keep sharing
    c.pause(None)
    qtbot.waitUntil(lambda: c.sharing is Sharing.PAUSED, timeout=20000)
    c._probe_load = lambda pids: None
    for _ in range(3):
        c._on_tick()
        time.sleep(0.25)
    assert c.sharing is Sharing.PAUSED  # a manual pause is never lifted by the policy


def test_no_engine_child_starts_before_the_runtime_is_ready(qtbot, make):
    c = make()
    asked = []
    c.engine_ready = lambda: asked.append(1) or False  # the runtime dialog was cancelled
    c.set_sharing(True)
    assert asked and c.sharing is Sharing.OFF and c.worker is None
    assert c.problem == "the engine runtime is not installed yet"
    failed = []
    c.master_failed.connect(failed.append)
    c.create_group("default", "g", 7733)
    assert failed == ["the engine runtime is not installed yet"] and c.master is None


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_the_worker_command_line_parses_and_dials_hops_only_on_windows(make, monkeypatch, platform):
    from app.cli import _parser

    c = make()
    monkeypatch.setattr(sys, "platform", platform)
    argv = c.worker_argv()[2:]  # after the interpreter and the script: molink's own arguments
    args = _parser().parse_args(argv)
    # Windows: no listener (its firewall would prompt), but the worker still dials its next stage
    assert args.direct and args.hop_listen is (platform != "win32"), argv
