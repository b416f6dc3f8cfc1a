"""The tray menu and window mode built from state, and the app's routing of commands (no engine)."""

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtWidgets import QMenu

from app.desktop.controller import Controller
from app.desktop.desktop import Desktop
from app.desktop.settings import Paths, Settings
from app.desktop.state import Act, Sharing, TrayState, menu
from app.desktop.tray import MainWindow, TrayView, fill_menu


def texts(qmenu: QMenu) -> list[str]:
    out = []
    for a in qmenu.actions():
        if a.isSeparator():
            continue
        if a.menu() is not None:
            out += [f"{a.text()} ▸ {sub.text()}" for sub in a.menu().actions()]
        else:
            out.append(a.text())
    return out


def find(qmenu: QMenu, act: Act):
    for a in qmenu.actions():
        if a.menu() is not None:
            hit = find(a.menu(), act)
            if hit is not None:
                return hit
        elif a.data() == act.value:
            return a
    return None


STATES = {
    "alone": TrayState(gpu="CPU"),
    "joined": TrayState(joined_group="Friends"),
    "sharing": TrayState(sharing=Sharing.SHARING, joined_group="Friends", layers=(0, 15), num_layers=30),
    "paused": TrayState(sharing=Sharing.PAUSED, joined_group="Friends", paused_until=float("inf")),
    "problem": TrayState(sharing=Sharing.PROBLEM, joined_group="Friends", problem="cannot reach the master"),
    "hosting": TrayState(hosting=True, master_ready=True, hosted_group="Friends", api_address="127.0.0.1:1"),
}


@pytest.mark.parametrize("name", list(STATES))
def test_the_qt_menu_is_the_state_menu(qtbot, name):
    state = STATES[name]
    view = TrayView(lambda: state)
    view.rebuild()
    items = menu(state, time.time())
    from app.desktop.state import action_texts

    assert texts(view.menu) == action_texts(items)
    share = find(view.menu, Act.SHARE)
    assert share.isCheckable() and share.isChecked() == (state.sharing in (Sharing.SHARING, Sharing.PROBLEM))
    assert share.isEnabled() == (state.joined_group is not None)
    assert not view.tray.icon().isNull()
    assert view.tray.toolTip().startswith("MoLink\n")


def test_menu_actions_emit_their_command_and_the_menu_is_rebuilt_on_open(qtbot):
    current = {"s": STATES["joined"]}
    view = TrayView(lambda: current["s"])
    got = []
    view.triggered.connect(got.append)
    find(view.menu, Act.SHARE).trigger()
    find(view.menu, Act.PAUSE_HOUR).trigger()  # disabled actions do not fire
    find(view.menu, Act.JOIN_GROUP).trigger()
    assert got == [Act.SHARE, Act.JOIN_GROUP]
    current["s"] = STATES["sharing"]
    view.menu.aboutToShow.emit()
    assert find(view.menu, Act.SHARE).isChecked()
    assert texts(view.menu)[0].startswith("Sharing layers 0–14 of 30")


def test_window_mode_has_the_same_controls(qtbot):
    current = {"s": STATES["joined"]}
    w = MainWindow(lambda: current["s"], "no tray here")
    qtbot.addWidget(w)
    got = []
    w.triggered.connect(got.append)
    assert w.share.isEnabled() and not w.share.isChecked()
    w.share.click()
    w.button(Act.JOIN_GROUP).click()
    assert not w.button(Act.FINISH).isEnabled()
    assert got == [Act.SHARE, Act.JOIN_GROUP]
    current["s"] = STATES["sharing"]
    w.refresh()
    assert w.share.isChecked() and w.button(Act.FINISH).isEnabled()
    assert "Sharing layers 0–14 of 30" in w.status.text()
    current["s"] = STATES["problem"]
    w.refresh()
    assert "Problem: cannot reach the master" in w.status.text()
    got.clear()
    w.close()  # closing the window quits (there is no tray to keep the app)
    assert got == [Act.QUIT]


def test_fill_menu_builds_submenus(qtbot):
    m = QMenu()
    fill_menu(m, menu(STATES["sharing"], time.time()), lambda act: None)
    assert "Pause sharing ▸ Until I resume" in texts(m)


def test_desktop_routes_commands_without_a_group(qtbot, tmp_path):
    c = Controller(Paths.under(tmp_path), Settings(), gpu="test GPU", probe_load=lambda pids: None)
    d = Desktop(c, use_tray=False, confirm=lambda q: True, exit_app=lambda: None)
    qtbot.addWidget(d.window)
    d.handle(Act.SHARE)  # not in a group: nothing starts, the reason is kept
    assert c.sharing is Sharing.OFF and c.worker is None and c.problem == "join or create a group first"
    dlg = d.open_join(None)
    qtbot.addWidget(dlg)
    assert dlg.isVisible()
    dlg.code.setText("12-34")
    dlg.join()
    assert "pairing code" in dlg.error.text().lower() and dlg.join_button.isEnabled()


def test_the_tray_process_imports_no_torch():
    code = (
        "import sys, app.cli, app.desktop.main, app.desktop.desktop, app.desktop.controller, app.desktop.dialogs, "
        "app.desktop.tray, app.desktop.selftest, app.desktop.supervisor\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": ""},
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_link_from_a_second_launch_opens_the_join_dialog_filled_in(qtbot, tmp_path):
    c = Controller(Paths.under(tmp_path), Settings(), gpu="test", probe_load=lambda pids: None)
    d = Desktop(c, use_tray=False, confirm=lambda q: True, exit_app=lambda: None)
    qtbot.addWidget(d.window)
    d.on_message("open molink://join?code=4782031956&master=192.168.1.20:7733&group=Friends")
    dlg = d.dialogs["join"]
    qtbot.addWidget(dlg)
    assert dlg.isVisible() and dlg.code.text() == "47-8203-1956" and dlg.address.text() == "192.168.1.20:7733"
    notes = []
    d.window.notify = lambda title, msg: notes.append((title, msg))
    d.on_message("open https://example.org/")
    assert notes and notes[0][0] == "MoLink cannot open that link"


def test_a_problem_shows_the_last_log_lines_in_the_menu(qtbot):
    s = TrayState(
        sharing=Sharing.PROBLEM,
        joined_group="g",
        problem="the worker stopped",
        last_log=("line one", "CUDA out of memory"),
    )
    view = TrayView(lambda: s)
    view.rebuild()
    assert "Why? (last log lines) ▸ CUDA out of memory" in texts(view.menu)


def test_quit_from_a_second_launch_ends_the_app_even_with_the_window_open(tmp_path):
    # Qt 6's quit() asks windows to close first, and window mode turns a close into "quit?":
    # the app must still end (the installer's uninstaller asks the running app to quit this way)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from PySide6.QtWidgets import QApplication\n"
        "from PySide6.QtCore import QTimer\n"
        "from app.desktop.controller import Controller\n"
        "from app.desktop.desktop import Desktop\n"
        "from app.desktop.settings import Paths, Settings\n"
        "app = QApplication([])\n"
        f"c = Controller(Paths.under(Path({str(tmp_path)!r})), Settings(), gpu='x', probe_load=lambda p: None)\n"
        "d = Desktop(c, use_tray=False)\n"
        "d.show()\n"
        "QTimer.singleShot(300, lambda: d.on_message('quit'))\n"
        "QTimer.singleShot(20000, lambda: sys.exit(3))\n"
        "sys.exit(app.exec())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"QT_QPA_PLATFORM": "offscreen", "PATH": ""},
    )
    assert r.returncode == 0, r.stderr


def test_first_run_welcome_leads_to_join_or_create_and_is_shown_once(qtbot, tmp_path):
    from app.desktop.settings import load

    c = Controller(Paths.under(tmp_path), Settings(), gpu="test", probe_load=lambda pids: None)
    d = Desktop(c, use_tray=False, confirm=lambda q: True, exit_app=lambda: None)
    qtbot.addWidget(d.window)
    w = d.welcome()
    qtbot.addWidget(w)
    assert load(c.paths).first_run_done
    w.create_button.click()
    assert d.dialogs["create"].isVisible() and not w.isVisible()
    qtbot.addWidget(d.dialogs["create"])


def test_pairing_failures_become_sentences_by_their_type():
    from app.desktop.join_dialog import _friendly
    from app.group.client import BadAddress, GroupCommandError, NoGroupFound
    from worker_core.pairing import Malformed, Refused, UnknownCode, Unreachable, WrongCode

    # the message text is never what decides: each type says the same whatever its words
    assert _friendly(WrongCode("anything")).startswith("That code is not right")
    assert "for 5 minutes" in _friendly(WrongCode("x"))  # the codes' lifetime, from the master's TTL
    for e in (UnknownCode("x"), Refused("wrong pairing code")):
        assert _friendly(e).startswith("That code is no longer valid")
    assert _friendly(NoGroupFound("x")).startswith("No group was found")
    for e in (Unreachable("x"), TimeoutError("no answer within 20 seconds")):
        assert _friendly(e).startswith("The group's master cannot be reached")
    assert _friendly(BadAddress("no such pairing code")).startswith("The address must look like HOST:PORT")
    # anything else is shown as it is, as a sentence
    assert _friendly(Malformed("sealed pairing message does not open")) == "Sealed pairing message does not open"
    assert _friendly(GroupCommandError("no master answered")) == "No master answered"
    assert _friendly(OSError("disk full")) == "OSError: disk full"


def test_the_join_dialog_pairs_with_a_links_every_address():
    from app.desktop.join_dialog import pairing_target
    from app.group.links import JoinLink, build_link, parse_link

    url = "molink://join?code=4782031956&master=25.0.0.10:7733&via=lan~192.168.10.10:7733,relay~25.0.0.100:7735"
    link = parse_link(url)
    assert pairing_target("47-8203-1956", "", link) == (build_link(link), None)  # the candidates are raced
    assert pairing_target("47-8203-1956", "25.0.0.10:7733", link) == (build_link(link), None)  # as filled in
    assert pairing_target("47-8203-1956", "10.1.1.1:7733", link) == ("47-8203-1956", "10.1.1.1:7733")  # typed
    assert pairing_target("11-1111-1111", "", link) == ("11-1111-1111", None)  # another code: the LAN
    assert pairing_target(f"  {url} ", "", None) == (url, None)  # a link pasted into the code field
    old = JoinLink(code="47-8203-1956", master="192.168.1.20:7733")  # a link without candidates
    assert pairing_target("47-8203-1956", "192.168.1.20:7733", old) == ("47-8203-1956", "192.168.1.20:7733")
    assert pairing_target("47-8203-1956", "", None) == ("47-8203-1956", None)


def test_windows_firewall_asked_once_for_the_apps_ports_and_rewritten_when_one_is_added(qtbot, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from app.desktop.system import firewall

    written: list[list[int]] = []
    monkeypatch.setattr(firewall, "write_rule", lambda ports: written.append(sorted(ports)) or "")
    asked: list[str] = []
    answer = [False]
    c = Controller(Paths.under(tmp_path), Settings(), gpu="test", probe_load=lambda pids: None)
    d = Desktop(c, use_tray=False, confirm=lambda q: asked.append(q) or answer[0], exit_app=lambda: None)
    qtbot.addWidget(d.window)
    monkeypatch.setattr(c, "hosting", lambda: True)
    c.master_info = {"group_port": 7733}
    d.offer_firewall_rule(platform="linux")
    assert asked == [] and c.settings.firewall_ports == [] and c.settings.firewall_allowed is None
    d.offer_firewall_rule(platform="win32")  # declined: remembered, no rule
    assert len(asked) == 1 and "TCP port 7733" in asked[0] and c.settings.firewall_ports == [7733]
    assert c.settings.firewall_allowed is False and written == []
    d.offer_firewall_rule(platform="win32")
    assert len(asked) == 1  # never asked twice for one port
    c.relay, c.relay_port = SimpleNamespace(running=lambda: False), 7735  # this PC runs a relay: a new port asks
    answer[0] = True
    d.offer_firewall_rule(platform="win32")
    assert len(asked) == 2 and "TCP ports 7733 and 7735" in asked[1]
    qtbot.waitUntil(lambda: written == [[7733, 7735]], timeout=5000)
    c.master_info = {"group_port": 7800}  # allowed before: the rule is rewritten without asking
    d.offer_firewall_rule(platform="win32")
    assert len(asked) == 2
    qtbot.waitUntil(lambda: written[-1] == [7735, 7800], timeout=5000)
    from app.desktop.settings import load

    kept = load(c.paths)  # kept across launches
    assert kept.firewall_ports == [7733, 7735, 7800] and kept.firewall_allowed is True
    c.relay = None


QUIT_WHILE_LOOKING = """
import asyncio, sys
from PySide6.QtWidgets import QApplication
from app.desktop.background import Background
app = QApplication([])
b = Background(lambda: asyncio.sleep(60), 120)  # a LAN look-up or a pairing still under way
b.start()
sys.exit(0)  # the user quits: the process must end cleanly, not abort
"""


def test_background_work_reports_on_the_qt_thread_and_never_holds_up_quitting(qtbot):
    import asyncio
    import os
    import threading

    from app.desktop.background import Background

    seen: list = []

    async def answer() -> int:
        await asyncio.sleep(0.05)
        return 42

    b = Background(answer, 10)
    b.done.connect(lambda r: seen.append((r, threading.current_thread() is threading.main_thread())))
    b.start()
    qtbot.waitUntil(lambda: bool(seen), timeout=5000)
    assert seen == [(42, True)]
    late = Background(lambda: asyncio.sleep(5), 0.1)
    late.failed.connect(lambda why: seen.append(why))
    late.start()
    qtbot.waitUntil(lambda: len(seen) == 2, timeout=5000)
    assert seen[1] == "no answer within 0 seconds"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run(
        [sys.executable, "-c", QUIT_WHILE_LOOKING], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])  # a QThread here aborted: 134


def test_a_firewall_rule_written_after_the_window_is_gone_tells_nobody_and_raises_nothing(qtbot, tmp_path, monkeypatch):
    """Quitting destroys the window while the firewall rule may still be written: its answer
    comes to no view (it used to reach a deleted label and raise in the Qt thread)."""
    import threading

    from PySide6.QtCore import QCoreApplication, QEvent
    from shiboken6 import isValid

    from app.desktop.background import _RUNNING
    from app.desktop.system import firewall

    release = threading.Event()
    monkeypatch.setattr(firewall, "write_rule", lambda ports: "" if release.wait(5) else "late")
    c = Controller(Paths.under(tmp_path), Settings(), gpu="test", probe_load=lambda pids: None)
    d = Desktop(c, use_tray=False, confirm=lambda q: True, exit_app=lambda: None)
    monkeypatch.setattr(c, "hosting", lambda: True)
    c.master_info = {"group_port": 7733}
    d.offer_firewall_rule(platform="win32")  # asked, allowed: the rule is being written
    window = d.window
    assert window is not None
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not isValid(window)
    with qtbot.captureExceptions() as errors:
        release.set()
        qtbot.waitUntil(lambda: d._firewall is not None and d._firewall not in _RUNNING, timeout=5000)
        qtbot.wait(100)  # its answer delivered on the Qt thread
    assert errors == []


def test_create_and_join_dialogs_take_a_relay(qtbot, tmp_path, monkeypatch):
    """A group created with a relay registers there (``--relay``); the join dialog finds a
    group through a relay by the code alone; a bad address is one sentence, nothing starts; the
    relay is remembered for next time."""
    from app.desktop.dialogs import CreateGroupDialog
    from app.desktop.join_dialog import JoinDialog

    c = Controller(Paths.under(tmp_path), Settings(), gpu="test", probe_load=lambda pids: None)
    started: list = []
    monkeypatch.setattr(c, "create_group", lambda *a: started.append(a))
    create = CreateGroupDialog(c)
    qtbot.addWidget(create)
    create.relay.setText("no port")
    create.create()
    assert started == [] and "HOST:PORT" in create.error.text()
    create.relay.setText("relay.example.net:7735")
    create.create()
    assert started and started[0][-1] == "relay.example.net:7735"

    paired: list = []

    async def fake_pair(code, address, folder, name, relay):
        paired.append((code, address, relay))
        raise RuntimeError("stop here")

    monkeypatch.setattr("app.group.client.pair", fake_pair)
    join = JoinDialog(c)
    qtbot.addWidget(join)
    join.code.setText("47-8203-1956")
    join.relay.setText("nope")
    join.join()
    assert paired == [] and "HOST:PORT" in join.error.text() and join.join_button.isEnabled()
    join.relay.setText("relay.example.net:7735")
    join.join()
    qtbot.waitUntil(lambda: bool(paired) and join.join_button.isEnabled(), timeout=5000)
    assert paired == [("47-8203-1956", None, "relay.example.net:7735")]  # by the code alone, at the relay
    assert c.settings.relay == "relay.example.net:7735"
    assert JoinDialog(c).relay.text() == "relay.example.net:7735"  # remembered


def test_create_group_passes_the_relay_to_the_master(tmp_path, monkeypatch):
    c = Controller(Paths.under(tmp_path), Settings(), gpu="test", probe_load=lambda pids: None)
    monkeypatch.setattr(c, "_ask_engine", lambda: True)
    argv: list = []

    class FakeSupervisor:
        def __init__(self, name, args, *a, **k):
            argv.extend(args)
            self.engine_event = self.crashed = self.stopped = SimpleNamespace(connect=lambda f: None)

        def start(self):
            pass

        def running(self):
            return False

    monkeypatch.setattr("app.desktop.controller.Supervisor", FakeSupervisor)
    c.create_group("default", "g", 7733, "relay.example.net:7735")
    assert argv[argv.index("--relay") + 1] == "relay.example.net:7735"
    argv.clear()
    c.create_group("default", "g", 7733)
    assert "--relay" not in argv


def test_quitting_ends_once_and_leaves_no_deadline_running(qtbot, tmp_path):
    """The app quits when its children stopped (quit_ready) or at the deadline, once: the
    deadline is stopped when the children stop first, so it never fires later on windows that
    were deleted meanwhile (it did, into the next test's event loop)."""
    c = Controller(Paths.under(tmp_path), Settings(), gpu="test", probe_load=lambda pids: None)
    exits = []
    d = Desktop(c, use_tray=False, confirm=lambda q: True, exit_app=lambda: exits.append(1))
    qtbot.addWidget(d.window)
    d.quit()  # nothing runs: the controller is ready to quit at once
    qtbot.waitUntil(lambda: exits == [1], timeout=5000)
    assert not d._deadline.isActive()
    c.quit_ready.emit()  # a late second signal changes nothing
    d._deadline.timeout.emit()
    assert exits == [1]
