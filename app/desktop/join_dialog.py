"""The join dialog: pair this PC with a group (a code or a join link; a master found on the LAN,
an address, or a relay), show the group's name and fingerprint, then start sharing.

Contract: as for :mod:`app.desktop.dialogs` (non-modal, only shows state and calls the
controller; the pairing exchange runs in a :class:`~app.desktop.background.Background` thread;
every failure is one sentence in ``error``).  :func:`pairing_target` is the pure choice of what
to pair with.
"""

from __future__ import annotations

import socket

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.group.links import JoinLink, build_link, parse_link
from master_core.invitations import TTL

from .background import Background, plain
from .controller import Controller
from .dialogs import BROWSE_SECONDS, PAIR_TIMEOUT, _error_label, _note, grouped_fingerprint, relay_text


def pairing_target(code: str, address: str, link: JoinLink | None) -> tuple[str, str | None]:
    """What the join dialog pairs with: (a code or a whole join link, a HOST:PORT or None).

    A link pasted into the code field goes whole (every address it lists is raced).  A dialog
    opened from a link whose code is still in the field pairs with that link (its LAN, mapped,
    IPv6 and relay addresses raced), unless the user typed another address; else the code,
    with the address typed (None: a group found on this network)."""
    code, address = code.strip(), address.strip()
    if code.lower().startswith("molink:"):
        return code, address or None
    if link is not None and code == link.code and (not address or address == link.master):
        return (build_link(link), None) if link.via else (code, link.master)
    return code, address or None


class JoinDialog(QDialog):
    """Pair with a group (a code or a join link; a master found on the LAN or an address),
    confirm, share."""

    joined = Signal(object)  # JoinedGroup, once the user started sharing

    def __init__(self, controller: Controller, link: JoinLink | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Join a group")
        self.c = controller
        self.link = link
        self.code = QLineEdit(link.code if link else "")
        self.code.setPlaceholderText("47-8203-1956, or the molink://join link")
        self.found = QListWidget()
        self.found.setMaximumHeight(90)
        self.refresh = QPushButton("Look again")
        self.address = QLineEdit(link.master if link and link.master else "")
        self.address.setPlaceholderText("HOST:PORT (leave empty to use a group found on this network)")
        self.relay = QLineEdit(controller.settings.relay)
        self.relay.setPlaceholderText("optional: HOST:PORT of the group's relay (finds the group by the code alone)")
        self.name = QLineEdit(socket.gethostname())
        self.memory = QDoubleSpinBox()
        self.memory.setRange(0, 4096)
        self.memory.setDecimals(1)
        self.memory.setSuffix(" GB")
        self.memory.setSpecialValueText("all free memory")
        self.memory.setValue(controller.settings.memory_limit_gb or 0)
        self.join_button = QPushButton("Join")
        self.join_button.setDefault(True)
        self.status = _note("")
        self.error = _error_label()
        self.confirm_text = _note("")
        self.share_button = QPushButton("Start sharing")
        self.later_button = QPushButton("Not now")
        self.stack = QStackedWidget()
        self.paired = None  # JoinedGroup after a successful pairing

        page1 = QWidget()
        form = QFormLayout(page1)
        form.addRow(
            _note(
                "Ask the group's owner for a pairing code or its join link (they find both in their MoLink "
                "menu: Show a pairing code)."
            )
        )
        form.addRow("Pairing code", self.code)
        if link is not None and link.via:
            ways = sorted({c.kind.value for c in link.via})
            listed = f"The link lists {len(link.via)} ways to reach the group ({', '.join(ways)}): all are tried."
            form.addRow(_note(listed))
        lan = QHBoxLayout()
        lan.addWidget(self.found)
        lan.addWidget(self.refresh)
        form.addRow("Groups on this network", lan)
        form.addRow("Or the master's address", self.address)
        form.addRow("Or through a relay", self.relay)
        form.addRow("This PC's name", self.name)
        form.addRow("Offer at most", self.memory)
        form.addRow(self.status)
        form.addRow(self.error)
        form.addRow(self.join_button)
        page2 = QWidget()
        lay2 = QVBoxLayout(page2)
        lay2.addWidget(self.confirm_text)
        row = QHBoxLayout()
        row.addWidget(self.share_button)
        row.addWidget(self.later_button)
        lay2.addLayout(row)
        self.stack.addWidget(page1)
        self.stack.addWidget(page2)
        QVBoxLayout(self).addWidget(self.stack)

        self.refresh.clicked.connect(self.look_for_masters)
        self.found.itemClicked.connect(self._pick)
        self.join_button.clicked.connect(self.join)
        self.code.returnPressed.connect(self.join)
        self.share_button.clicked.connect(lambda: self._finish(True))
        self.later_button.clicked.connect(lambda: self._finish(False))
        self._browse: Background | None = None
        self._pairing: Background | None = None

    def look_for_masters(self) -> None:
        from worker_core.discovery import browse

        self.found.clear()
        self.found.addItem("Looking…")
        self.refresh.setEnabled(False)
        self._browse = Background(lambda: browse(BROWSE_SECONDS), BROWSE_SECONDS + 10)
        self._browse.done.connect(self._masters)
        self._browse.failed.connect(
            lambda why: (self.found.clear(), self.found.addItem(f"Cannot look: {why}"), self.refresh.setEnabled(True))
        )
        self._browse.start()

    def _masters(self, found: list) -> None:
        self.found.clear()
        self.refresh.setEnabled(True)
        if not found:
            self.found.addItem("None found (mDNS may be blocked here: type the address)")
            return
        for addresses, port, group in found:
            item = QListWidgetItem(f"{group or 'a group'} — {addresses[0]}:{port}")
            item.setData(Qt.ItemDataRole.UserRole, f"{addresses[0]}:{port}")
            self.found.addItem(item)

    def _pick(self, item: QListWidgetItem) -> None:
        address = item.data(Qt.ItemDataRole.UserRole)
        if address:
            self.address.setText(address)

    def join(self) -> None:
        from worker_core.pairing import PairingError, parse_code

        code, address = pairing_target(self.code.text(), self.address.text(), self.link)
        try:
            if code.lower().startswith("molink:"):
                parse_link(code)
            else:
                parse_code(code)
        except (PairingError, ValueError) as e:
            self.error.setText(str(e))
            return
        from app.group.client import pair

        relay = relay_text(self.relay, self.error)
        if relay is None:
            return
        self.error.clear()
        self.join_button.setEnabled(False)
        self.status.setText("Pairing…")
        self.c.remember(relay=relay)
        folder, name = self.c.paths.worker_dir, self.name.text().strip() or socket.gethostname()
        self._pairing = Background(
            lambda: pair(code, address, folder, name, relay or None), PAIR_TIMEOUT, describe=_friendly
        )
        self._pairing.done.connect(self._paired)
        self._pairing.failed.connect(self._failed)
        self._pairing.start()

    def _failed(self, why: str) -> None:
        self.join_button.setEnabled(True)
        self.status.clear()
        self.error.setText(why)

    def _paired(self, joined) -> None:  # noqa: ANN001 - JoinedGroup
        from worker_core.identity import fingerprint

        self.paired = joined
        self.c.paths.worker_dir.mkdir(parents=True, exist_ok=True)
        joined.save(self.c.paths.worker_dir)  # the master has admitted this PC: keep the membership
        self.confirm_text.setText(
            f"This PC joined the group “{joined.group}” as “{joined.name}” (master {joined.master_address}).\n\n"
            f"The master's fingerprint is {grouped_fingerprint(fingerprint(joined.master_cert))}. "
            "If it differs from what the group's owner sees, choose Not now and tell them.\n\n"
            f"Sharing offers {_offer(self.memory.value())} of this PC to the group."
        )
        self.stack.setCurrentIndex(1)

    def _finish(self, share: bool) -> None:
        if self.paired is not None:
            self.c.accept_join(self.paired, self.memory.value() or None, share=share)
            self.joined.emit(self.paired)
        self.accept()


def _offer(limit_gb: float) -> str:
    return f"at most {limit_gb:g} GB" if limit_gb else "all free memory"


def _friendly(e: BaseException) -> str:
    """A pairing failure as one sentence for people, not for the command line (by its type)."""
    from app.group.client import BadAddress, NoGroupFound
    from worker_core.pairing import Refused, UnknownCode, Unreachable, WrongCode

    if isinstance(e, WrongCode):
        return (
            f"That code is not right. Check it with the group's owner (codes work once and for {TTL / 60:.0f} minutes)."
        )
    if isinstance(e, (UnknownCode, Refused)):
        return "That code is no longer valid (used, expired or tried too often). Ask the group's owner for a new one."
    if isinstance(e, NoGroupFound):
        return "No group was found on this network. Type the master's address (HOST:PORT) given by the group's owner."
    if isinstance(e, (Unreachable, TimeoutError)):
        return (
            "The group's master cannot be reached at that address. Check the address, and that its group port is open."
        )
    if isinstance(e, BadAddress):
        return "The address must look like HOST:PORT, for example 192.168.1.20:7733."
    why = plain(e)
    return why[:1].upper() + why[1:]
