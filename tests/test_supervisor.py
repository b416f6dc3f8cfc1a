"""The tray's child supervisor with small fake children: events, control channel, hard stop, crash restarts."""

import sys
import textwrap

import pytest

pytest.importorskip("pytestqt")

from app.desktop import supervisor as sup
from app.desktop.supervisor import ChildState, Supervisor

# a child that speaks the control protocol: prints events, obeys {"cmd": "stop"} and EOF
OBEDIENT = textwrap.dedent(
    """
    import json, sys
    print("@molink " + json.dumps({"event": "connected", "master": "x"}), flush=True)
    print("a log line on stdout", flush=True)
    print("a log line on stderr", file=sys.stderr, flush=True)
    print("@molink not json", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line).get("cmd")
        print("@molink " + json.dumps({"event": "got", "cmd": cmd}), flush=True)
        if cmd == "stop":
            print("@molink " + json.dumps({"event": "left"}), flush=True)
            sys.exit(0)
    sys.exit(0)  # EOF: the parent is gone or asked us to stop
    """
)
STUBBORN = "import time\nprint('ignoring everything', flush=True)\nwhile True: time.sleep(1)\n"
CRASHER = "import sys\nprint('boom: the last words', file=sys.stderr, flush=True)\nsys.exit(3)\n"


def child(tmp_path, code, name="c", restart=False):
    return Supervisor(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", restart=restart)


def test_events_logs_and_graceful_stop(qtbot, tmp_path):
    s = child(tmp_path, OBEDIENT)
    events = []
    s.engine_event.connect(events.append)
    with qtbot.waitSignal(s.engine_event, timeout=10000):
        s.start()
    assert events[0] == {"event": "connected", "master": "x"}
    qtbot.waitUntil(lambda: len(s.last_lines()) >= 3, timeout=10000)
    assert set(s.last_lines()) == {"a log line on stdout", "a log line on stderr", "@molink not json"}
    assert s.send("ping")
    qtbot.waitUntil(lambda: {"event": "got", "cmd": "ping"} in events, timeout=10000)
    with qtbot.waitSignal(s.stopped, timeout=10000) as stopped:
        s.stop("stop", grace=10)
    assert stopped.args == [0]
    assert {"event": "left"} in events and s.state is ChildState.IDLE
    log = (tmp_path / "c.log").read_text()
    assert "a log line on stderr" in log
    assert not [line for line in log.splitlines() if line[20:].startswith("@molink {")]  # events never reach the log


def test_eof_alone_stops_an_obedient_child(qtbot, tmp_path):
    s = child(tmp_path, OBEDIENT)
    with qtbot.waitSignal(s.engine_event, timeout=10000):
        s.start()
    with qtbot.waitSignal(s.stopped, timeout=10000) as stopped:
        s.stop("unknown-command", grace=10)  # not "stop": only the closed stdin can end it ...
        s._proc.closeWriteChannel()  # ... as when the tray itself dies
    assert stopped.args == [0]


def test_a_child_that_ignores_the_channel_is_ended_after_the_grace(qtbot, tmp_path):
    s = child(tmp_path, STUBBORN)
    s.start()
    qtbot.waitUntil(lambda: s.last_lines() == ["ignoring everything"], timeout=10000)
    with qtbot.waitSignal(s.stopped, timeout=10000):
        s.stop("stop", grace=0.5)
    assert "did not stop in time" in (tmp_path / "c.log").read_text()


def test_a_crash_is_reported_with_its_last_lines_and_restarted_with_backoff(qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr(sup, "BACKOFF_FIRST", 0.2)
    s = child(tmp_path, CRASHER, restart=True)
    crashes = []
    s.crashed.connect(lambda code, lines: crashes.append((code, lines)))
    s.start()
    qtbot.waitUntil(lambda: len(crashes) >= 2, timeout=15000)  # restarted after the first crash
    assert crashes[0] == (3, ["boom: the last words"])
    assert s._backoff >= 0.8  # doubled on each crash
    with qtbot.waitSignal(s.stopped, timeout=10000):
        s.stop()  # stopping while a restart is pending cancels it
    assert s.state is ChildState.IDLE
    n = len(crashes)
    qtbot.wait(600)
    assert len(crashes) == n


def test_a_crash_handler_sees_the_restart_pending_and_can_cancel_it(qtbot, tmp_path, monkeypatch):
    # the tray stops a worker that died while leaving from inside `crashed`: no restart may follow
    monkeypatch.setattr(sup, "BACKOFF_FIRST", 0.2)
    s = child(tmp_path, CRASHER, restart=True)
    seen, stops, crashes = [], [], []
    s.stopped.connect(stops.append)

    def on_crash(code, lines):
        crashes.append(code)
        seen.append((s.state, s.running()))
        s.stop()

    s.crashed.connect(on_crash)
    s.start()
    qtbot.waitUntil(lambda: bool(stops), timeout=10000)
    assert seen == [(ChildState.WAITING, False)] and stops == [0]
    qtbot.wait(600)  # three backoffs: a restart would have crashed again by now
    assert crashes == [3] and s.state is ChildState.IDLE


def test_a_program_that_cannot_start_is_a_crash(qtbot, tmp_path):
    s = Supervisor("missing", [str(tmp_path / "no-such-program")], tmp_path / "m.log", restart=False)
    with qtbot.waitSignal(s.crashed, timeout=10000):
        s.start()
    assert "cannot start" in (tmp_path / "m.log").read_text()


def test_a_long_running_child_log_is_rotated_while_it_runs(qtbot, tmp_path, monkeypatch):
    """A chatty child over a long run: the log moves to NAME.1 whenever it passes the bound, so
    the two files together never hold much more than twice it."""
    import app.desktop.supervisor as sup

    monkeypatch.setattr(sup, "LOG_ROTATE_BYTES", 20_000)
    chatty = "import sys\nfor i in range(3000): print(f'line {i:05d} ' + 'x' * 40, flush=True)\n"
    s = child(tmp_path, chatty, name="chatty")
    current, rotated = tmp_path / "chatty.log", tmp_path / "chatty.log.1"
    s.start()
    qtbot.waitUntil(lambda: current.exists() and "exited with code 0" in current.read_text(), timeout=30000)
    s.close()
    assert rotated.exists() and current.exists()
    assert rotated.stat().st_size <= 20_000 + 200 and current.stat().st_size <= 20_000 + 200
    assert "line 02999" in current.read_text()  # the newest lines are kept
