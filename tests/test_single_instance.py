"""One tray app per user: real processes take the lock, hand messages over, and recover from a crashed owner."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from app.desktop.system.single_instance import SingleInstance, default_name

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # seconds: bound on every wait for a child (2 shared cores, Qt start-up)
JOIN = "open molink://join?code=47-8203-1956&master=192.168.1.20:7733"

CHILD = r"""
import sys
from pathlib import Path
from PySide6.QtCore import QCoreApplication, QTimer
from app.desktop.system.single_instance import SingleInstance

name, lock_dir, *messages = sys.argv[1:]
app = QCoreApplication([])
si = SingleInstance(name, Path(lock_dir))
if si.acquire():
    print("acquired", flush=True)

    def got(m):
        print("message:" + m, flush=True)
        if m == "quit":
            si.release()
            app.quit()

    si.message_received.connect(got)
    QTimer.singleShot(120_000, app.quit)  # never outlive a broken test
    sys.exit(app.exec())
print("busy", flush=True)
for m in messages:
    print(f"sent:{si.send(m, 10_000)}:{m}", flush=True)
"""


class Child:
    """One ``python -c CHILD`` process whose stdout lines are read by a thread; every wait is bounded."""

    def __init__(self, tmp_path: Path, name: str, *messages: str) -> None:
        self.err_path = tmp_path / f"child-{uuid.uuid4().hex[:6]}.err"
        self.err = open(self.err_path, "w")  # noqa: SIM115 - the child's stderr while it runs
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, name, str(tmp_path / "locks"), *messages],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None  # started with stdout=PIPE
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.01, left))
            except queue.Empty:
                raise AssertionError(
                    f"no {text!r} within {WAIT} s; saw {self.seen}; stderr: {self.err_path.read_text()[-2000:]}"
                ) from None
            self.seen.append(line)
            if line == text:
                return

    def wait(self) -> int:
        return self.proc.wait(WAIT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self.err.close()


@pytest.fixture
def children(tmp_path):
    started: list[Child] = []

    def start(*args: str) -> Child:
        c = Child(tmp_path, *args)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def unique_name() -> str:
    return f"molink-test-{uuid.uuid4().hex[:12]}"


def test_second_launch_hands_its_messages_to_the_first(children):
    name = unique_name()
    first = children(name)
    first.expect("acquired")
    second = children(name, "show", JOIN)
    second.expect("busy")
    second.expect("sent:True:show")
    second.expect(f"sent:True:{JOIN}")
    assert second.wait() == 0
    first.expect("message:show")
    first.expect(f"message:{JOIN}")
    quitter = children(name, "quit")
    quitter.expect("sent:True:quit")
    first.expect("message:quit")
    assert first.wait() == 0
    assert first.seen == ["acquired", "message:show", f"message:{JOIN}", "message:quit"]
    # the owner released the lock on quit: the next launch owns it
    again = children(name, "quit")
    again.expect("acquired")


def test_a_crashed_owner_leaves_a_lock_and_socket_that_the_next_launch_takes_over(children, tmp_path):
    name = unique_name()
    crashed = children(name)
    crashed.expect("acquired")
    crashed.proc.kill()  # SIGKILL: no cleanup at all
    crashed.proc.wait(WAIT)
    assert (tmp_path / "locks" / f"{name}.lock").exists()  # the stale lock is really there
    if sys.platform.startswith("linux"):
        from PySide6.QtCore import QDir

        # and so is the stale socket (Qt's user-only listen replaces it by a rename; removeServer() is the
        # documented way and is kept for the other listen paths)
        assert Path(QDir.tempPath(), name).exists()
    heir = children(name)
    heir.expect("acquired")
    sender = children(name, "show")
    sender.expect("sent:True:show")
    heir.expect("message:show")
    children(name, "quit").expect("sent:True:quit")
    assert heir.wait() == 0


def test_in_process_owner_emits_message_received(qtbot, children, tmp_path):
    name = unique_name()
    si = SingleInstance(name, tmp_path / "locks")
    try:
        assert si.acquire() and si.owner and si.listening
        assert not SingleInstance(name, tmp_path / "locks").acquire()  # a second object in this process
        with qtbot.waitSignal(si.message_received, timeout=int(WAIT * 1000)) as blocker:
            sender = children(name, "open molink://join?code=12-3456-7890")
            # the sender blocks until we acknowledge, which needs this event loop: waitSignal runs it
        assert blocker.args == ["open molink://join?code=12-3456-7890"]
        qtbot.waitUntil(
            lambda: "sent:True:open molink://join?code=12-3456-7890" in _drain(sender), timeout=int(WAIT * 1000)
        )
    finally:
        si.release()
    assert not si.owner and SingleInstance(name, tmp_path / "locks").acquire()


def _drain(child: Child) -> list[str]:
    while True:
        try:
            child.seen.append(child.lines.get_nowait())
        except queue.Empty:
            return child.seen


def test_send_without_a_running_instance_fails_within_its_timeout(qapp, tmp_path):
    si = SingleInstance(unique_name(), tmp_path)
    t0 = time.monotonic()
    assert si.send("show", timeout_ms=300) is False
    assert time.monotonic() - t0 < 3.0


def test_a_silent_client_does_not_block_the_owner(qtbot, children, tmp_path):
    from PySide6.QtNetwork import QLocalSocket

    name = unique_name()
    si = SingleInstance(name, tmp_path / "locks")
    try:
        assert si.acquire()
        silent = QLocalSocket()
        silent.connectToServer(name)
        qtbot.waitUntil(lambda: silent.state() == QLocalSocket.LocalSocketState.ConnectedState, timeout=5000)
        silent.write(b"\xff\xff\xff\xff")  # announces 4 GiB: dropped at once
        qtbot.waitUntil(lambda: silent.state() == QLocalSocket.LocalSocketState.UnconnectedState, timeout=5000)
        with qtbot.waitSignal(si.message_received, timeout=int(WAIT * 1000)) as blocker:
            children(name, "show")
        assert blocker.args == ["show"]
    finally:
        si.release()


def test_default_name_is_per_user_and_sanitised():
    assert default_name("alice") == "molink-tray-alice"
    odd = default_name("DOMAIN\\Zoë Smith")
    assert odd.startswith("molink-tray-domain_zo_") and all(c.isalnum() or c in "-_" for c in odd)
    assert default_name("a/b") != default_name("a_b")  # sanitising does not merge two users
    assert default_name().startswith("molink-tray-")
    with pytest.raises(ValueError):
        SingleInstance("bad/name", Path("."))
