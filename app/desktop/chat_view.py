"""The widgets the chat window is made of: the transcript, the input box, the change-master dialog.

Contract
--------
* :class:`Transcript` shows the conversation and loads no resources (an answer's
  ``![](file:///...)`` reads no file).  ``append_turn(role, text)`` adds a turn's header and text
  (an assistant turn starts as "…" and is the answer being written), ``render_answer(text, note)``
  re-renders that answer from its start to the end of the document as Markdown with an optional
  grey note, keeping the view at the end when it was there; ``render_all(history)`` redraws every
  turn.
* :class:`InputBox`: Enter emits ``submitted``, Shift+Enter is a new line.
* :class:`TargetDialog`: another master's address and API key; ``chosen(ChatTarget)`` on OK, one
  sentence under the fields for an address it cannot use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import (
    QColor,
    QFont,
    QImage,
    QKeyEvent,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
)
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QTextBrowser,
    QWidget,
)

from .chat_text import ChatTarget, Role, Turn, parse_target


class InputBox(QPlainTextEdit):
    """Enter sends, Shift+Enter is a new line."""

    submitted = Signal()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        shift = event.modifiers() & Qt.KeyboardModifier.ShiftModifier
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not shift:
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class Transcript(QTextBrowser):
    """The conversation view; it loads no resources: an answer's ``![](file:///...)`` reads no file.

    (A null answer would let QTextDocument fall back to reading local files, so images get a
    blank 1x1 image and anything else an empty text.)
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._answer_pos = 0  # document position where the current answer's text starts

    def loadResource(self, kind: int, name: QUrl) -> Any:  # noqa: N802 - Qt override
        if kind == QTextDocument.ResourceType.ImageResource.value:
            blank = QImage(1, 1, QImage.Format.Format_ARGB32)
            blank.fill(0)
            return blank
        return ""

    def append_turn(self, role: Role, text: str) -> None:
        doc = self.document()
        cursor = QTextCursor(doc)
        cursor.movePosition(QTextCursor.MoveOperation.End)
        if not doc.isEmpty():
            cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
            cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
        header = QTextCharFormat()
        header.setFontWeight(QFont.Weight.Bold)
        header.setForeground(QColor("#1565c0" if role == "user" else "#2e7d32"))
        cursor.insertText("You" if role == "user" else "Assistant", header)
        cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
        if role == "user":
            quote = QTextBlockFormat()
            quote.setLeftMargin(12)
            cursor.setBlockFormat(quote)
            cursor.insertText(text, QTextCharFormat())  # what the user typed, shown as typed
        else:
            self._answer_pos = cursor.position()
            cursor.insertText("…", QTextCharFormat())
        self.scroll_to_end()

    def render_answer(self, text: str, note: str | None = None) -> None:
        """Re-render the answer being written (from its start to the end of the document) as Markdown."""
        bar = self.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        cursor = QTextCursor(self.document())
        cursor.setPosition(self._answer_pos)
        cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        cursor.setBlockFormat(QTextBlockFormat())
        cursor.setCharFormat(QTextCharFormat())
        if text:
            cursor.insertMarkdown(text)
        elif note is None:
            cursor.insertText("…")
        if note:
            grey = QTextCharFormat()
            grey.setForeground(QColor("#757575"))
            grey.setFontItalic(True)
            cursor.movePosition(QTextCursor.MoveOperation.End)
            if text:
                cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
            cursor.insertText(note, grey)
        if at_end:
            self.scroll_to_end()

    def render_all(self, history: Iterable[Turn]) -> None:
        self.clear()
        for turn in history:
            self.append_turn(turn.role, turn.content)
            if turn.role == "assistant":
                self.render_answer(turn.content)

    def scroll_to_end(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())


class TargetDialog(QDialog):
    """Type another master's address and API key; ``chosen(ChatTarget)`` on OK."""

    chosen = Signal(object)

    def __init__(self, current: ChatTarget | None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Chat with another master")
        self.address = QLineEdit(current.base_url if current else "")
        self.address.setPlaceholderText("192.168.1.20:8000")
        self.api_key = QLineEdit(current.api_key or "" if current else "")
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.api_key.setPlaceholderText("none (a master on this PC needs none)")
        self.error = QLabel()
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #c62828;")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self._ok)
        self.buttons.rejected.connect(self.reject)
        form = QFormLayout(self)
        form.addRow("Master address", self.address)
        form.addRow("API key", self.api_key)
        form.addRow(self.error)
        form.addRow(self.buttons)

    def _ok(self) -> None:
        try:
            target = parse_target(self.address.text(), self.api_key.text())
        except ValueError as e:
            self.error.setText(str(e))
            return
        self.chosen.emit(target)
        self.accept()
