"""`molink app --selftest`: the app's own code paths end to end, offscreen, with nobody at the screen.

Contract: :func:`run` starts the app in a throwaway data folder, prints the menu's action texts
one per line, creates a group on this PC through the create-group dialog (a local master on
the embedded default model, this PC's worker joining it and sharing), asks one question
through the chat window's own code path, prints the question and the streamed answer, quits
the app (children stopped through their control channel) and returns 0.  Any failure, or
no progress within ``DEADLINE`` seconds, prints one line ``selftest failed: ...`` and returns 1.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

DEADLINE = 900.0  # seconds for the whole run (a first run converts the default model)
QUESTION = "What is the capital of France? Answer in one short sentence."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(model: str = "default", root: Path | None = None, out=None) -> int:  # noqa: ANN001
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QTimer, qInstallMessageHandler

    # the offscreen platform says, for every window, what it cannot do (raise, size hints): noise here
    qInstallMessageHandler(
        lambda _kind, _ctx, msg: None if "This plugin does not support" in msg else print(msg, file=sys.stderr)
    )
    from PySide6.QtWidgets import QApplication

    from .controller import Controller
    from .desktop import Desktop
    from .settings import Paths, Settings
    from .state import Sharing, action_texts, menu

    out = out or sys.stdout
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="molink-selftest-")) if root is None else root
    app = QApplication.instance() or QApplication(sys.argv[:1])
    paths = Paths.under(root)
    controller = Controller(paths, Settings())
    desk = Desktop(controller, use_tray=False, confirm=lambda _q: True)
    result = {"code": 1}
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    def fail(why: str) -> None:
        if result.get("failed"):
            return
        result["failed"] = True
        say(f"selftest failed: {why}")
        for line in controller.snapshot().last_log[-5:]:
            say(f"  {line}")
        result["code"] = 1
        # on the next turn of the loop, not from inside the child's `crashed` handler that called us
        QTimer.singleShot(0, desk.quit)

    say("menu:")
    for text in action_texts(menu(controller.snapshot(), time.time())):
        say(f"  {text}")

    dialog = desk.open_create()
    if model == "default":
        dialog.use_default.setChecked(True)
    else:
        dialog.use_local.setChecked(True)
        dialog.local_path.setText(model)
    dialog.name.setText("selftest")
    dialog.port.setValue(_free_port())
    dialog.share_too.setChecked(True)
    controller.master_failed.connect(lambda why: fail(f"cannot create the group: {why}"))
    say(f"creating a group on this PC (model {model}) and sharing this PC …")
    dialog.create()

    asked = {"done": False}

    def check() -> None:
        if result.get("failed") or asked["done"]:
            return
        s = controller.snapshot()
        if s.sharing is Sharing.PROBLEM and s.problem:
            fail(f"sharing: {s.problem}")
            return
        if s.sharing is Sharing.SHARING and s.group_serving:
            asked["done"] = True
            say(
                f"sharing: {s.layers and f'layers {s.layers[0]}-{s.layers[1] - 1}'} of {s.num_layers}; group serving "
                f"({time.monotonic() - t0:.0f} s)"
            )
            ask()

    def ask() -> None:
        chat = desk.open_chat()
        say(f"question: {QUESTION}")
        pieces: list[str] = []
        chat.token_received.connect(pieces.append)

        def finished(answer: str) -> None:
            say(f"answer (streamed in {len(pieces)} pieces): {answer.strip()}")
            if not answer.strip() or "".join(pieces) != answer:
                fail("the streamed pieces do not make up the answer")
                return
            say("OK")
            result["code"] = 0
            desk.quit()

        chat.answer_finished.connect(finished)
        chat.failed.connect(lambda why: fail(f"chat: {why}"))
        chat.ask(QUESTION)

    poll = QTimer()
    poll.timeout.connect(check)
    poll.start(200)
    QTimer.singleShot(int(DEADLINE * 1000), lambda: fail(f"no answer within {DEADLINE:.0f} s"))
    app.exec()
    poll.stop()
    if own_root:
        shutil.rmtree(root, ignore_errors=True)
    return int(result["code"])
