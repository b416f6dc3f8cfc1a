"""The app end to end with real engine processes on 127.0.0.1: create a group, join it (wrong and
right code), the Share toggle starting and stopping a real worker, and turning sharing off
mid-answer with a spare member leaving the answer identical to a fault-free one."""

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("pytestqt")

from tiny_models import make_tiny_checkpoint

from app.desktop.controller import Controller
from app.desktop.desktop import Desktop
from app.desktop.settings import Paths, Settings
from app.desktop.state import Act, Sharing
from app.group.links import JoinLink, parse_link

pytestmark = pytest.mark.slow  # the app with real engine children


WAIT = 120_000  # ms: the longest any step here may take (model load on a busy 2-core machine)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama", num_layers=4, seed=3)


@pytest.fixture
def desk(qtbot, tmp_path):
    c = Controller(
        Paths.under(tmp_path / "me"), Settings(group_host="127.0.0.1"), gpu="test", probe_load=lambda pids: None
    )  # a hosted group listens on loopback only in tests
    d = Desktop(c, use_tray=False, confirm=lambda q: True, exit_app=lambda: None)
    yield d
    # every child stops through its control channel, bounded
    with qtbot.waitSignal(c.quit_ready, timeout=60_000, raising=False):
        c.quit()
    for s in (c.worker, c.master):
        if s is not None:
            assert s.wait_stopped(30_000)
    c.changed.disconnect()
    d.window.deleteLater()


def _create(qtbot, d: Desktop, ckpt, share: bool = True) -> dict:
    dlg = d.open_create()
    qtbot.addWidget(dlg)
    dlg.use_local.setChecked(True)
    dlg.local_path.setText(str(ckpt))
    dlg.name.setText("test-group")
    dlg.port.setValue(_free_port())
    dlg.share_too.setChecked(share)
    with qtbot.waitSignal(d.c.master_ready, timeout=WAIT) as ready:
        dlg.create()
    qtbot.waitUntil(
        lambda: dlg.stack.currentWidget() is dlg.code_panel and "-" in dlg.code_panel.code.text(), timeout=WAIT
    )
    return {"info": ready.args[0], "dialog": dlg}


def _pair_spare(code: str, port: int, folder) -> None:
    from app.group.client import pair_with_group

    joined = asyncio.run(pair_with_group(code, f"127.0.0.1:{port}", folder, "spare"))
    joined.save(folder)


def test_create_then_join_with_wrong_and_right_code_and_the_toggle(qtbot, desk, ckpt, tmp_path):
    c = desk.c
    made = _create(qtbot, desk, ckpt, share=False)
    info, panel = made["info"], made["dialog"].code_panel
    assert info["group"] == "test-group" and info["group_port"]
    assert panel.link.text().startswith("molink://join?code=") and "Valid for" in panel.expiry.text()
    # the master's own measure of who can join, and its candidates in the link (loopback here: this network only)
    assert "Who can join: only this network can join" in panel.reach.text(), panel.reach.text()
    assert f"port {info['group_port']}" in panel.reach.text()
    assert f"via=lan~127.0.0.1:{info['group_port']}" in panel.link.text(), panel.link.text()
    assert c.snapshot().hosting and c.snapshot().sharing is Sharing.OFF

    # a wrong code: one sentence, nothing saved
    join = desk.open_join(None)
    qtbot.addWidget(join)
    good = panel.code.text()
    wrong = good[:-1] + ("0" if good[-1] != "0" else "1")
    join.code.setText(wrong)
    join.address.setText(f"127.0.0.1:{info['group_port']}")
    join.join()
    qtbot.waitUntil(lambda: join.error.text() != "", timeout=WAIT)
    assert join.error.text().startswith("That code is not right") and c.joined() is None
    # the right code, from the join link alone (no address typed: the link's candidates are raced):
    # the group's name and the master's fingerprint are shown before sharing starts
    # (the wrong try counted against this code but did not burn it)
    via = parse_link(panel.link.text()).via
    join = desk.open_join(JoinLink(code=good, via=via))  # as a molink:// link opened from a chat would
    qtbot.addWidget(join)
    assert join.code.text() == good and join.address.text() == ""
    join.join()
    qtbot.waitUntil(lambda: join.stack.currentIndex() == 1, timeout=WAIT)
    assert "“test-group”" in join.confirm_text.text() and "fingerprint" in join.confirm_text.text()
    assert c.sharing is Sharing.OFF and c.joined() is not None
    join.share_button.click()  # start sharing: a real worker process joins over mutual TLS
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=WAIT)
    s = c.snapshot()
    assert s.layers == (0, 4) and s.num_layers == 4
    assert s.path == "this PC"  # the worker's "connected" event: it dialled the master's loopback candidate
    qtbot.waitUntil(lambda: c.snapshot().group_serving and c.snapshot().members_online == 1, timeout=WAIT)
    assert c.snapshot().members_total == 1
    assert c.snapshot().members[0].split(": ")[1].startswith("this PC"), c.snapshot().members  # the Members submenu
    pid = c.worker.pid()
    assert pid

    # the toggle off: the worker leaves through its control channel and exits
    desk.handle(Act.SHARE)
    assert c.sharing is Sharing.STOPPING
    qtbot.waitUntil(lambda: c.sharing is Sharing.OFF, timeout=WAIT)
    assert not c.worker.running()
    api = f"http://{info['api']}"
    qtbot.waitUntil(lambda: not _get(api + "/health")["workers"], timeout=WAIT)
    log = (c.paths.logs_dir / "worker.log").read_text()
    assert "exited with code 0" in log and "did not stop in time" not in log
    # and on again
    desk.handle(Act.SHARE)
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=WAIT)
    assert c.worker.pid() != pid


def test_sharing_off_mid_answer_with_a_spare_keeps_the_answer_identical(qtbot, desk, ckpt, tmp_path):
    c = desk.c
    info = _create(qtbot, desk, ckpt, share=True)["info"]
    qtbot.waitUntil(lambda: c.sharing is Sharing.SHARING, timeout=WAIT)
    api = f"http://{info['api']}"
    # a spare member, as a friend's PC would be: paired with its own code, then sharing
    codes = []
    c.request_code(codes.append)
    qtbot.waitUntil(lambda: bool(codes), timeout=WAIT)
    spare_dir = tmp_path / "spare"
    _pair_spare(codes[0]["code"], info["group_port"], spare_dir)
    spare = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--data-dir", str(spare_dir), "--device", "cpu", "--supervised"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        qtbot.waitUntil(
            lambda: len(_get(api + "/health")["workers"]) == 2 and _get(api + "/health")["status"] == "ok", timeout=WAIT
        )
        body = {
            "model": info["model"],
            "prompt": [5, 6, 7, 8, 9],
            "max_tokens": 450,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }

        pieces: list[str] = []
        done = threading.Event()
        times: dict[str, float] = {}

        def stream() -> None:
            req = urllib.request.Request(
                api + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data: {"):
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
            done.set()
            times["done"] = time.monotonic()

        epoch = _get(api + "/health")["epoch"]
        mine = [w for w in _get(api + "/health")["workers"] if w["stage"] is not None]
        t = threading.Thread(target=stream, daemon=True)
        t.start()
        qtbot.waitUntil(lambda: len(pieces) >= 10, timeout=WAIT)
        assert not done.is_set()
        desk.handle(Act.SHARE)  # this PC stops sharing mid-answer

        def moved() -> bool:  # the master let this PC's worker go and re-planned onto the spare
            health = _get(api + "/health")
            return health["epoch"] > epoch and len(health["workers"]) == 1

        qtbot.waitUntil(moved, timeout=WAIT)
        times["left"] = time.monotonic()
        qtbot.waitUntil(lambda: c.sharing is Sharing.OFF, timeout=WAIT)  # and its process ended
        qtbot.waitUntil(done.is_set, timeout=WAIT)
        assert times["left"] < times["done"], "the group moved to the spare only after the answer ended"
        health = _get(api + "/health")
        assert health["epoch"] > epoch and len(health["workers"]) == 1  # re-planned onto the spare
        assert mine, "this PC's worker served a stage"
        # the fault-free answer, on the pipeline as it is now
        fault_free = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    api + "/v1/completions",
                    json.dumps({**body, "stream": False}).encode(),
                    {"Content-Type": "application/json"},
                ),
                timeout=300,
            ).read()
        )["choices"][0]["text"]
        assert "".join(pieces) == fault_free
    finally:
        spare.stdin.close()  # EOF: the spare stops by itself
        try:
            spare.wait(30)
        except subprocess.TimeoutExpired:
            spare.kill()
            spare.wait()


def test_create_on_a_port_in_use_is_one_sentence(qtbot, desk, ckpt):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        dlg = desk.open_create()
        qtbot.addWidget(dlg)
        dlg.use_local.setChecked(True)
        dlg.local_path.setText(str(ckpt))
        dlg.port.setValue(busy.getsockname()[1])
        with qtbot.waitSignal(desk.c.master_failed, timeout=WAIT):
            dlg.create()
    text = dlg.error.text()
    assert text.startswith("Cannot start the group: ") and "in use" in text.lower() and "Traceback" not in text
    assert "\n" not in text and dlg.create_button.isEnabled()
    assert not desk.c.snapshot().hosting


def test_this_pc_offers_a_relay_from_the_menu(qtbot, desk):
    """The menu's relay toggle starts a supervised `molink relay` child (here on loopback, any
    port), shows its port, and stops it; the choice is remembered for the next start."""
    import socket

    c = desk.c
    c.settings.relay_port = 0  # any free port in tests
    desk.handle(Act.RELAY)
    qtbot.waitUntil(lambda: c.snapshot().relay_port is not None, timeout=WAIT)
    s = c.snapshot()
    assert s.relaying and c.settings.run_relay
    with socket.create_connection(("127.0.0.1", s.relay_port), timeout=5):
        pass  # it listens
    from app.desktop.state import action_texts, menu

    assert f"Relay for groups on this PC (port {s.relay_port})" in action_texts(menu(s, 0.0))
    desk.handle(Act.RELAY)
    qtbot.waitUntil(lambda: not c.snapshot().relaying, timeout=WAIT)
    assert c.relay is None and not c.settings.run_relay
