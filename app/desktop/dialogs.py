"""The app's dialogs: create a group on this PC, show a pairing code, settings, the first-run
welcome (joining a group: :mod:`app.desktop.join_dialog`).

Contract: each dialog is a non-modal ``QDialog`` over a :class:`~app.desktop.controller.
Controller`; it only shows state and calls the controller (or, for pairing, runs the network
exchange in a :class:`~app.desktop.background.Background` thread).  Every failure is one
sentence in the dialog's ``error`` label, never a traceback.  Tests drive the dialogs through
their widgets (``code``, ``address``, ``join_button`` ...) and signals.
"""

from __future__ import annotations

import socket
import time

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QFont, QGuiApplication
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from master_core.invitations import TTL

from .background import Background
from .controller import Controller

PAIR_TIMEOUT = 40.0  # seconds for discovery plus one pairing exchange
BROWSE_SECONDS = 3.0  # how long the LAN is listened to for masters


def _error_label() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    label.setStyleSheet("color: #c62828;")
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def _note(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def relay_text(field: QLineEdit, error: QLabel) -> str | None:
    """The relay a dialog's field names ("" for none), or None after saying in ``error`` that
    it is no HOST:PORT."""
    from worker_core.address import is_address

    relay = field.text().strip()
    if relay and not is_address(relay):
        error.setText("The relay's address looks like relay.example.net:7735 (HOST:PORT).")
        return None
    return relay


def grouped_fingerprint(hex_digest: str, groups: int = 8) -> str:
    """``ab12 cd34 …``: the first ``groups`` groups of four, easy to read aloud and compare."""
    h = hex_digest.lower()
    return " ".join(h[i : i + 4] for i in range(0, min(len(h), 4 * groups), 4))


class PairingCodePanel(QWidget):
    """A pairing code shown large, with Copy, its expiry, the join link and reachability help."""

    new_code = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.code = QLabel("…")
        font = QFont("monospace")
        font.setStyleHint(QFont.StyleHint.Monospace)
        font.setPointSize(30)
        font.setBold(True)
        self.code.setFont(font)
        self.code.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.code.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.expiry = QLabel()
        self.expiry.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.link = QLineEdit()
        self.link.setReadOnly(True)
        self.copy_button = QPushButton("Copy code")
        self.copy_link_button = QPushButton("Copy link")
        self.new_button = QPushButton("New code")
        self.reach = _note("")
        self.fingerprint = _note("")
        self.error = _error_label()
        self._expires_at = 0.0
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._tick)
        buttons = QHBoxLayout()
        for b in (self.copy_button, self.copy_link_button, self.new_button):
            buttons.addWidget(b)
        lay = QVBoxLayout(self)
        lay.addWidget(_note("Read this code to the friend who joins (it works once):"))
        lay.addWidget(self.code)
        lay.addWidget(self.expiry)
        lay.addLayout(buttons)
        lay.addWidget(_note("Or send them this link (MoLink opens it):"))
        lay.addWidget(self.link)
        lay.addWidget(self.fingerprint)
        lay.addWidget(self.reach)
        lay.addWidget(self.error)
        self.copy_button.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.code.text()))
        self.copy_link_button.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.link.text()))
        self.new_button.clicked.connect(self.new_code.emit)

    def show_code(self, info: dict, master_fingerprint: str | None = None) -> None:
        self.error.clear()
        self.code.setText(str(info.get("code", "")))
        self.link.setText(str(info.get("link", "")))
        self._expires_at = time.monotonic() + float(info.get("expires_in") or TTL)
        self._tick()
        self._timer.start(1000)
        port, host = info.get("group_port"), info.get("host")
        if master_fingerprint:
            self.fingerprint.setText(
                f"This group's fingerprint: {grouped_fingerprint(master_fingerprint)} (a joining friend sees the same)."
            )
        reach = info.get("reach")
        forward = (
            f"Friends elsewhere need to reach this PC's group port: forward TCP port {port} on your router to this PC "
            f"({host}) and allow it in the firewall, then they join with your public address and port {port} in the "
            f"address field (HOST:{port})."
        )
        if isinstance(reach, str) and reach:  # what the master measured: a mapped port, a relay, or why not
            anywhere = reach.startswith("friends anywhere")
            self.reach.setText(f"Who can join: {reach}." + ("" if anywhere else " " + forward))
        else:
            self.reach.setText("Friends on this network find the group by itself. " + forward)

    def show_error(self, text: str) -> None:
        self.error.setText(text)

    def _tick(self) -> None:
        left = self._expires_at - time.monotonic()
        if left <= 0:
            self.expiry.setText("This code has expired: make a new one.")
            self._timer.stop()
            return
        self.expiry.setText(f"Valid for {int(left) // 60}:{int(left) % 60:02d} · single use")


class CreateGroupDialog(QDialog):
    """Choose the model, name and port; start the master; then show a pairing code."""

    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Create a group on this PC")
        self.c = controller
        s = controller.settings
        self.use_default = QRadioButton("The built-in model (SmolLM2-135M-Instruct, small, for trying MoLink)")
        self.use_local = QRadioButton("A model on this PC (a checkpoint folder or a .gguf file)")
        self.use_hub = QRadioButton("A model from Hugging Face (its id, e.g. Qwen/Qwen2.5-7B-Instruct)")
        self.choice = QButtonGroup(self)
        for i, b in enumerate((self.use_default, self.use_local, self.use_hub)):
            self.choice.addButton(b, i)
        self.local_path = QLineEdit()
        self.browse = QPushButton("Browse…")
        self.hub_id = QLineEdit()
        self.name = QLineEdit(s.group_name or socket.gethostname())
        self.port = QSpinBox()
        self.port.setRange(1024, 65535)
        self.port.setValue(s.group_port)
        self.relay = QLineEdit(s.relay)
        self.relay.setPlaceholderText("optional: HOST:PORT of a relay (molink relay) friends reach when this PC is not")
        self.share_too = QCheckBox("Also share this PC's GPU with the group")
        self.share_too.setChecked(True)
        self.create_button = QPushButton("Create group")
        self.create_button.setDefault(True)
        self.status = _note("")
        self.error = _error_label()
        self.code_panel = PairingCodePanel()
        self.stack = QStackedWidget()

        model = s.model or "default"
        if model == "default":
            self.use_default.setChecked(True)
        elif "/" in model and not model.startswith(("/", ".", "~")) and ":" not in model:
            self.use_hub.setChecked(True)
            self.hub_id.setText(model)
        else:
            self.use_local.setChecked(True)
            self.local_path.setText(model)

        form_page = QWidget()
        form = QVBoxLayout(form_page)
        form.addWidget(
            _note(
                "This PC will run the group: it hands out pairing codes, plans which PC serves which layers, "
                "and answers chat and API requests."
            )
        )
        form.addWidget(self.use_default)
        form.addWidget(self.use_local)
        row = QHBoxLayout()
        row.addWidget(self.local_path)
        row.addWidget(self.browse)
        form.addLayout(row)
        form.addWidget(self.use_hub)
        form.addWidget(self.hub_id)
        fields = QFormLayout()
        fields.addRow("Group name", self.name)
        fields.addRow("Group port", self.port)
        fields.addRow("Relay", self.relay)
        form.addLayout(fields)
        form.addWidget(self.share_too)
        form.addWidget(self.status)
        form.addWidget(self.error)
        form.addWidget(self.create_button)
        self.stack.addWidget(form_page)
        self.stack.addWidget(self.code_panel)
        lay = QVBoxLayout(self)
        lay.addWidget(self.stack)

        self.browse.clicked.connect(self._browse)
        self.create_button.clicked.connect(self.create)
        self.code_panel.new_code.connect(controller.request_code)
        controller.master_ready.connect(self._master_ready)
        controller.master_failed.connect(self._failed)
        controller.code_ready.connect(self._code_ready)
        controller.code_failed.connect(self.code_panel.show_error)
        self._self_join: Background | None = None

    def model_source(self) -> str:
        if self.use_local.isChecked():
            return self.local_path.text().strip()
        if self.use_hub.isChecked():
            return self.hub_id.text().strip()
        return "default"

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model folder")
        if path:
            self.local_path.setText(path)

    def create(self) -> None:
        model = self.model_source()
        if not model:
            self.error.setText("Choose a model: a folder or .gguf file, or a Hugging Face id.")
            return
        relay = relay_text(self.relay, self.error)
        if relay is None:
            return
        self.error.clear()
        self.create_button.setEnabled(False)
        self.status.setText(
            "Starting the group… (the first start converts or downloads the model and can take minutes)"
        )
        self.c.create_group(model, self.name.text().strip(), self.port.value(), relay)

    def _failed(self, reason: str) -> None:
        self.create_button.setEnabled(True)
        self.status.clear()
        self.error.setText(f"Cannot start the group: {reason}")

    def _master_ready(self, info: dict) -> None:
        self.status.setText("The group is running.")
        if self.share_too.isChecked() and not self._joined_here(info):
            self._join_own_group(info)
        else:
            self.c.request_code()

    def _joined_here(self, info: dict) -> bool:
        j = self.c.joined()
        return j is not None and j.master_port == info.get("group_port") and j.master_host in ("127.0.0.1", "localhost")

    def _join_own_group(self, info: dict) -> None:
        """This PC's worker joins its own group with a code of its own, then shares."""
        port = info.get("group_port")

        def got_code(code_info: dict) -> None:
            from app.group.client import pair_with_group

            folder, name = self.c.paths.worker_dir, socket.gethostname()
            self._self_join = Background(
                lambda: pair_with_group(code_info["code"], f"127.0.0.1:{port}", folder, name), PAIR_TIMEOUT
            )
            self._self_join.done.connect(self._joined_own)
            self._self_join.failed.connect(
                lambda why: (
                    self.code_panel.show_error(f"This PC could not join its own group: {why}"),
                    self.c.request_code(),
                )
            )
            self._self_join.start()

        self.c.request_code(got_code)

    def _joined_own(self, joined) -> None:  # noqa: ANN001 - JoinedGroup
        self.c.accept_join(joined, self.c.settings.memory_limit_gb)
        self.c.request_code()

    def _code_ready(self, info: dict) -> None:
        from worker_core.identity import fingerprint, load_or_create

        try:
            fp = fingerprint(load_or_create(self.c.paths.master_dir / "identity", "molink-master").cert_pem)
        except (OSError, ValueError):
            fp = None
        self.code_panel.show_code(info, fp)
        self.stack.setCurrentWidget(self.code_panel)


class ShowCodeDialog(QDialog):
    """A fresh pairing code of the group this PC runs."""

    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Pairing code")
        self.c = controller
        self.panel = PairingCodePanel()
        QVBoxLayout(self).addWidget(self.panel)
        self.panel.new_code.connect(controller.request_code)
        controller.code_ready.connect(self._ready)
        controller.code_failed.connect(self.panel.show_error)
        controller.request_code()

    def _ready(self, info: dict) -> None:
        from worker_core.identity import fingerprint, load_or_create

        try:
            fp = fingerprint(load_or_create(self.c.paths.master_dir / "identity", "molink-master").cert_pem)
        except (OSError, ValueError):
            fp = None
        self.panel.show_code(info, fp)


class SettingsDialog(QDialog):
    """Memory budget, device, start at login, automatic pause, chat target, and where things are."""

    def __init__(self, controller: Controller, secrets, autostart, parent: QWidget | None = None) -> None:  # noqa: ANN001
        super().__init__(parent)
        self.setWindowTitle("MoLink settings")
        self.c, self.secrets, self.autostart = controller, secrets, autostart
        s = controller.settings
        self.memory = QDoubleSpinBox()
        self.memory.setRange(0, 4096)
        self.memory.setDecimals(1)
        self.memory.setSuffix(" GB")
        self.memory.setSpecialValueText("all free memory")
        self.memory.setValue(s.memory_limit_gb or 0)
        self.device = QComboBox()
        self.device.addItems(["auto", "cuda", "cpu"])
        self.device.setCurrentText(s.device if s.device in ("auto", "cuda", "cpu") else "auto")
        self.login = QCheckBox("Start MoLink when I log in")
        self.login.setChecked(autostart.is_enabled() if autostart else False)
        self.auto_pause = QCheckBox("Pause sharing while a game or another program uses the GPU heavily")
        self.auto_pause.setChecked(s.auto_pause)
        self.share_on_start = QCheckBox("Resume sharing when MoLink starts, if it was on")
        self.share_on_start.setChecked(s.share_on_start)
        self.chat_master = QLineEdit(s.chat_master)
        self.chat_master.setPlaceholderText("this PC's group")
        self.api_key = QLineEdit(secrets.get("chat-api-key") or "" if secrets else "")
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.warning = _error_label()
        if secrets is not None and secrets.warning:
            self.warning.setText(secrets.warning)
        self.save_button = QPushButton("Save")
        form = QFormLayout(self)
        form.addRow("Offer at most", self.memory)
        form.addRow("Compute on", self.device)
        form.addRow(self.login)
        form.addRow(self.auto_pause)
        form.addRow(self.share_on_start)
        form.addRow("Chat with the master at", self.chat_master)
        form.addRow("Its API key", self.api_key)
        form.addRow(self.warning)
        form.addRow(_note(f"Logs: {controller.paths.logs_dir}\nData: {controller.paths.data_dir}"))
        form.addRow(self.save_button)
        self.save_button.clicked.connect(self.save)

    def save(self) -> None:
        from .settings import save

        s = self.c.settings
        s.memory_limit_gb = self.memory.value() or None
        s.device = self.device.currentText()
        s.auto_pause = self.auto_pause.isChecked()
        s.share_on_start = self.share_on_start.isChecked()
        s.chat_master = self.chat_master.text().strip()
        s.start_at_login = self.login.isChecked()
        if self.autostart is not None and self.autostart.is_enabled() != self.login.isChecked():
            try:
                self.autostart.set_enabled(self.login.isChecked())
            except OSError as e:
                self.warning.setText(f"Cannot change start at login: {e}")
                return
        if self.secrets is not None:
            key = self.api_key.text().strip()
            self.secrets.set("chat-api-key", key) if key else self.secrets.delete("chat-api-key")
        try:
            save(self.c.paths, s)
        except OSError as e:
            self.warning.setText(f"Cannot save the settings: {e}")
            return
        self.c.changed.emit()
        self.accept()


class WelcomeDialog(QDialog):
    """First run: what MoLink does, and the two ways in (join or create); nothing starts by itself."""

    chosen = Signal(str)  # "join" | "create" | "later"

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Welcome to MoLink")
        lay = QVBoxLayout(self)
        lay.addWidget(
            _note(
                "MoLink lets a group of friends pool their PCs to run a large language model none of them could run "
                "alone. Each PC serves a part of the model; one PC runs the group.\n\n"
                "Nothing is shared until you say so: MoLink lives in the tray (by the clock), and its menu has "
                "“Share my GPU”, pause and stop. Start at login is off unless you turn it on in Settings."
            )
        )
        row = QHBoxLayout()
        self.join_button = QPushButton("Join a friend's group…")
        self.create_button = QPushButton("Create a group on this PC…")
        self.later_button = QPushButton("Later")
        for b, what in ((self.join_button, "join"), (self.create_button, "create"), (self.later_button, "later")):
            b.clicked.connect(lambda _=False, what=what: (self.chosen.emit(what), self.accept()))
            row.addWidget(b)
        lay.addLayout(row)
