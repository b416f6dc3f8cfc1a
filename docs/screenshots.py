"""Screenshots of the desktop app for the README, taken from a real run under Xvfb.

Run: ``xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/screenshots.py``.  It
creates a group on this PC with the embedded default model (a real master and worker), lets
this PC share, opens the pairing code, the join dialog and the chat window with a streamed
answer, and writes ``docs/app-*.png``.  Not a test: the pictures are for people to look at.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QPoint, QTimer
from PySide6.QtWidgets import QApplication

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.desktop.controller import Controller  # noqa: E402
from app.desktop.desktop import Desktop  # noqa: E402
from app.desktop.selftest import _free_port  # noqa: E402
from app.desktop.settings import Paths, Settings  # noqa: E402
from app.desktop.state import Sharing  # noqa: E402
from app.desktop.tray import TrayView  # noqa: E402

OUT = Path(__file__).resolve().parent
QUESTION = "Give me three tips for a good night's sleep."


def main() -> int:
    app = QApplication(sys.argv[:1])
    root = Path(tempfile.mkdtemp(prefix="molink-shots-"))
    c = Controller(Paths.under(root), Settings())
    desk = Desktop(c, use_tray=False, confirm=lambda q: True)
    state = {"phase": "create"}

    def shot(widget, name: str) -> None:
        widget.grab().save(str(OUT / f"app-{name}.png"))
        print("wrote", OUT / f"app-{name}.png", flush=True)

    create = desk.open_create()
    create.name.setText("Friends")
    create.port.setValue(_free_port())
    create.resize(560, 420)
    shot(create, "create")
    create.create()

    def step() -> None:
        s = c.snapshot()
        if (
            state["phase"] == "create"
            and s.sharing is Sharing.SHARING
            and s.group_serving
            and create.code_panel.code.text() != "…"
        ):
            state["phase"] = "shots"
            create.resize(560, 480)
            shot(create, "pairing-code")
            view = TrayView(c.snapshot)
            view.menu.popup(QPoint(40, 40))
            QTimer.singleShot(500, lambda: (shot(view.menu, "tray-menu"), view.menu.hide()))
            join = desk.open_join(None)
            join.code.setText("47-8203-1956")
            join.resize(560, 380)
            QTimer.singleShot(5000, lambda: shot(join, "join"))
            chat = desk.open_chat()
            chat.resize(720, 560)
            chat.answer_finished.connect(lambda _a: QTimer.singleShot(300, lambda: (shot(chat, "chat"), desk.quit())))
            QTimer.singleShot(1500, lambda: chat.ask(QUESTION))

    t = QTimer()
    t.timeout.connect(step)
    t.start(300)
    QTimer.singleShot(600_000, desk.quit)
    app.exec()
    return 0


if __name__ == "__main__":
    sys.exit(main())
