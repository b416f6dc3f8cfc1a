"""The chat window: a multi-turn conversation with the group, streamed from the master's API.

Contract
--------
``ChatWindow(target)`` talks to one master's OpenAI-compatible API (``ChatTarget``: base URL and
optional API key, sent as ``Authorization: Bearer``).  Each turn POSTs the whole history to
``/v1/chat/completions`` with ``stream: true`` through ``QNetworkAccessManager`` and reads the
Server-Sent Events on ``readyRead`` (no threads, no asyncio); tokens are shown as they arrive,
the answer being re-rendered as Markdown at most ``RENDER_HZ`` times a second.

* ``ask(text)`` is the Send button's code path (tests and the self-test use it); it returns
  False (and emits ``failed``) when nothing was sent.  Signals: ``token_received(str)`` per
  text piece, ``answer_finished(str)`` with the whole answer, ``failed(str)`` with one sentence,
  ``stopped(str)`` with the partial answer, ``target_changed(ChatTarget)`` when the user picks
  another master with **Change…** (storing it, key included, is the controller's job).
* ``stop()`` aborts the reply: the master cancels a request whose client went away.
  ``new_chat()`` clears the history; ``copy_markdown(last_only)`` puts Markdown on the clipboard.
* While visible, ``/health`` is polled every ``HEALTH_PERIOD_MS`` (each poll bounded by
  ``HEALTH_TIMEOUT_MS``): the status line shows the model, tokens/s and "served by N PCs"; while
  the group cannot serve, input and Send are disabled and the reason is one sentence.
* Every failure (HTTP error with OpenAI's error body, unreachable master, a stream ending in an
  error or cut off) is one sentence in the window; the failed question goes back to the input
  box and the conversation stays usable.
* Every turn sends the history as it was sent and answered (the user's text as sent, the answer
  as streamed, never re-formatted), so each prompt starts with the previous turn's prompt and
  answer and the group's prefix cache reuses them; ``last_usage`` is the last complete answer's
  (prompt tokens, cached tokens) from the stream's usage chunk.

The request body, the reading of a stream chunk, error sentences, ``/health`` and the tokens/s
maths are pure functions in :mod:`.chat_text`; the SSE framing is :mod:`.sse`; the streamed
answer and the window's phases are :mod:`.chat_stream`; the transcript, the input box and the
change-master dialog are :mod:`.chat_view`.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

from PySide6.QtCore import QByteArray, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QCloseEvent, QGuiApplication, QHideEvent, QShowEvent
from PySide6.QtNetwork import QNetworkAccessManager, QNetworkProxy, QNetworkReply, QNetworkRequest
from PySide6.QtWidgets import QHBoxLayout, QLabel, QMenu, QPushButton, QToolButton, QVBoxLayout, QWidget

from .chat_stream import Answer, Phase, move, network_why
from .chat_text import (
    DEFAULT_MAX_TOKENS,
    ChatTarget,
    HealthView,
    Role,
    Turn,
    chat_body,
    error_sentence,
    parse_health,
    sentence,
    status_text,
    transcript_markdown,
    unreachable_sentence,
)
from .chat_view import InputBox, TargetDialog, Transcript

log = logging.getLogger("molink.chat")

HEALTH_PERIOD_MS = 2000  # /health poll period while the window is visible
HEALTH_TIMEOUT_MS = 5000  # bound on one /health or /v1/models request
STREAM_IDLE_TIMEOUT_MS = 300_000  # a chat reply that sends no byte for this long fails (queued requests wait)
RENDER_HZ = 20  # re-renders of the answer being written, per second at most


class ChatWindow(QWidget):
    token_received = Signal(str)
    answer_finished = Signal(str)
    failed = Signal(str)
    stopped = Signal(str)
    target_changed = Signal(ChatTarget)

    def __init__(self, target: ChatTarget | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("MoLink chat")
        self.resize(720, 640)
        self.max_tokens = DEFAULT_MAX_TOKENS
        self.extra_body: dict[str, Any] = {}  # more request fields (tests: temperature, ignore_eos)
        self.last_request_body: dict | None = None
        self.last_usage: tuple[int, int] | None = None  # the last complete answer's (prompt, cached) tokens
        self._target: ChatTarget | None = None
        self._history: list[Turn] = []
        self._phase = Phase.IDLE
        self._answer: Answer | None = None
        self._model: str | None = None
        self._health: HealthView | None = None  # None: not known yet
        self._health_reply: QNetworkReply | None = None
        self._models_reply: QNetworkReply | None = None
        self._rate: float | None = None
        self._net = QNetworkAccessManager(self)
        self._build()
        self._poll = QTimer(self)
        self._poll.setInterval(HEALTH_PERIOD_MS)
        self._poll.timeout.connect(self.poll_health)
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(1000 // RENDER_HZ)
        self._render_timer.timeout.connect(self._render_answer)
        self.set_target(target)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        self.target_label = QLabel()
        self.target_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.change_button = QPushButton("Change…")
        self.change_button.clicked.connect(self.open_change_dialog)
        top = QHBoxLayout()
        top.addWidget(self.target_label, 1)
        top.addWidget(self.change_button)

        self.transcript = Transcript()
        self.transcript.setOpenExternalLinks(True)
        self.transcript.setPlaceholderText("Ask the group anything. Enter sends, Shift+Enter starts a new line.")

        self.status_label = QLabel(status_text(None, None, None))
        self.reason_label = QLabel()
        self.reason_label.setWordWrap(True)
        self.reason_label.setStyleSheet("color: #c62828;")
        self.reason_label.hide()
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #c62828;")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.hide()

        self.input = InputBox()
        self.input.setPlaceholderText("Message the group")
        self.input.setFixedHeight(80)
        self.input.submitted.connect(self._send_clicked)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self._send_clicked)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.new_button = QPushButton("New chat")
        self.new_button.clicked.connect(self.new_chat)
        self.copy_button = QToolButton()
        self.copy_button.setText("Copy")
        self.copy_button.setPopupMode(QToolButton.ToolButtonPopupMode.MenuButtonPopup)
        self.copy_button.clicked.connect(lambda: self.copy_markdown(False))
        menu = QMenu(self.copy_button)
        menu.addAction("Copy conversation", lambda: self.copy_markdown(False))
        menu.addAction("Copy last answer", lambda: self.copy_markdown(True))
        self.copy_button.setMenu(menu)

        buttons = QHBoxLayout()
        buttons.addWidget(self.new_button)
        buttons.addWidget(self.copy_button)
        buttons.addStretch(1)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.send_button)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.transcript, 1)
        lay.addWidget(self.status_label)
        lay.addWidget(self.reason_label)
        lay.addWidget(self.error_label)
        lay.addWidget(self.input)
        lay.addLayout(buttons)
        self.setFocusProxy(self.input)

    # ------------------------------------------------------------------ public
    @property
    def target(self) -> ChatTarget | None:
        return self._target

    @property
    def history(self) -> tuple[Turn, ...]:
        return tuple(self._history)

    def is_busy(self) -> bool:
        return self._phase is not Phase.IDLE

    def can_send(self) -> bool:
        return self._target is not None and (self._health is None or self._health.serving) and not self.is_busy()

    def set_target(self, target: ChatTarget | None) -> None:
        if target == self._target and target is not None:
            return
        if self.is_busy():
            self.stop()
        self._target = target
        self._model, self._health, self._rate = None, None, None
        stale = (self._health_reply, self._models_reply)
        self._health_reply = self._models_reply = None  # first: an aborted reply's finished is then ignored
        for reply in stale:
            if reply is not None:
                reply.abort()
        if target is None:
            self.target_label.setText("Connected to: nothing yet")
        else:
            host = urlsplit(target.base_url).hostname or ""
            local = host in ("127.0.0.1", "localhost", "::1")  # never through a proxy
            kind = QNetworkProxy.ProxyType.NoProxy if local else QNetworkProxy.ProxyType.DefaultProxy
            self._net.setProxy(QNetworkProxy(kind))
            keyed = " (with API key)" if target.api_key else ""
            self.target_label.setText(f"Connected to: {target.base_url}{keyed}")
            self._fetch_model()
            if self.isVisible():
                self.poll_health()
        self._update_controls()

    def ask(self, text: str) -> bool:
        """Send one user turn with the whole history.

        Returns False when nothing was sent: empty text (silently), or busy, no target, or the group
        known not to serve (``failed`` is emitted with the reason).
        """
        text = text.strip()
        if not text:
            return False
        why = None
        if self.is_busy():
            why = "An answer is still being written; stop it first."
        elif self._target is None:
            why = "No group to chat with yet: create or join a group, or use Change… to choose a master."
        elif self._health is not None and not self._health.serving:
            why = self._health.reason or "The group cannot answer now."
        if why is not None:
            self._fail(why)
            return False
        self.error_label.hide()
        self._history.append(Turn("user", text))
        self._append_turn("user", text)
        if self._model is None:
            self._move(Phase.CONNECTING)
            self._fetch_model()
        else:
            self._send()
        return True

    def stop(self) -> None:
        """Stop the answer being written (the master cancels the request when its client goes)."""
        if self._phase is Phase.CONNECTING:
            self._move(Phase.IDLE)
            self._drop_last_question()
            return
        answer = self._answer
        if self._phase is not Phase.STREAMING or answer is None:
            return
        answer.stopping = True
        if answer.reply is not None:
            answer.reply.abort()  # finished follows (synchronously in Qt 6); _finish is idempotent
        if self._answer is answer:
            self._finish(answer)

    def new_chat(self) -> None:
        if self.is_busy():
            self.stop()
        self._history.clear()
        self.transcript.clear()
        self.error_label.hide()
        self._rate = None
        self._update_status()
        self.input.setFocus()

    def copy_markdown(self, last_only: bool = False) -> str:
        text = transcript_markdown(self._history, last_only)
        QGuiApplication.clipboard().setText(text)
        return text

    def open_change_dialog(self) -> TargetDialog:
        dialog = TargetDialog(self._target, self)
        dialog.chosen.connect(self._target_chosen)
        dialog.open()
        return dialog

    # ------------------------------------------------------------------ health and model
    def poll_health(self) -> None:
        if self._target is None or self._health_reply is not None:
            return
        reply = self._net.get(self._request("/health", HEALTH_TIMEOUT_MS))
        self._health_reply = reply
        reply.finished.connect(lambda: self._health_done(reply))

    def _health_done(self, reply: QNetworkReply) -> None:
        reply.deleteLater()
        if reply is not self._health_reply or self._target is None:
            return
        self._health_reply = None
        status, body = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute), bytes(reply.readAll().data())
        self._health = parse_health(status, body, self._target.base_url, None if status else self._why(reply))
        if self._model is None and self._health.model:
            self._set_model(self._health.model)
        self._update_controls()

    def _fetch_model(self) -> None:
        if self._target is None or self._models_reply is not None:
            return
        reply = self._net.get(self._request("/v1/models", HEALTH_TIMEOUT_MS))
        self._models_reply = reply
        reply.finished.connect(lambda: self._models_done(reply))

    def _models_done(self, reply: QNetworkReply) -> None:
        reply.deleteLater()
        if reply is not self._models_reply or self._target is None:
            return
        self._models_reply = None
        status, body = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute), bytes(reply.readAll().data())
        model, why = None, None
        if status is None:
            why = unreachable_sentence(self._target.base_url, self._why(reply))
        elif status != 200:
            why = error_sentence(status, body)
        else:
            try:
                data = json.loads(body.decode("utf-8"))
                model = data["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError, RecursionError):
                why = sentence(f"The master at {self._target.base_url} did not say which model it serves")
        if isinstance(model, str) and model:
            self._set_model(model)
        if self._phase is Phase.CONNECTING:
            if self._model is not None:
                self._send()
            else:
                self._move(Phase.IDLE)
                self._drop_last_question()
                self._fail(why or "The master did not say which model it serves.")

    def _set_model(self, model: str) -> None:
        self._model = model
        self._update_status()

    # ------------------------------------------------------------------ one answer
    def _send(self) -> None:
        if self._target is None or self._model is None:
            raise RuntimeError("chat window: a turn was sent without a target or a model")
        body = chat_body(self._model, self._history, self.max_tokens, self.extra_body)
        self.last_request_body = body
        self.last_usage = None
        self._move(Phase.STREAMING)
        answer = Answer()
        self._answer = answer
        self._rate = None
        self._append_turn("assistant", "")
        req = self._request("/v1/chat/completions", STREAM_IDLE_TIMEOUT_MS)
        req.setHeader(QNetworkRequest.KnownHeaders.ContentTypeHeader, "application/json")
        req.setRawHeader(b"Accept", b"text/event-stream")
        reply = self._net.post(req, QByteArray(json.dumps(body).encode("utf-8")))
        answer.reply = reply
        reply.readyRead.connect(lambda: self._read(answer))
        reply.finished.connect(lambda: self._reply_finished(answer))
        self._update_controls()
        chars = sum(len(t.content) for t in self._history)
        log.info("chat turn sent: %d messages, %d characters", len(self._history), chars)

    def _read(self, answer: Answer) -> None:
        reply = answer.reply
        if reply is None or answer is not self._answer or answer.stopping or answer.error is not None:
            return
        data = bytes(reply.readAll().data())
        if not data:
            return
        status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
        if status != 200:
            answer.keep_error_body(data)
            return
        for piece in answer.pieces(data):
            self.token_received.emit(piece)
            if answer is not self._answer or answer.stopping:  # a slot stopped it
                return
        if answer.error is not None:
            reply.abort()  # finished follows: _finish reports the error
            return
        self._rate = answer.meter.rate()
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _reply_finished(self, answer: Answer) -> None:
        if answer is self._answer:
            self._read(answer)  # the last bytes (no-op when stopping or failed)
            if answer is self._answer:
                self._finish(answer)
        if answer.reply is not None:
            answer.reply.deleteLater()

    def _finish(self, answer: Answer) -> None:
        """The reply ended (stopped, failed, or complete): decide which, once."""
        self._answer = None
        reply = answer.reply
        text = "".join(answer.text)
        self._render_timer.stop()
        if answer.stopping:
            if text:
                self._history.append(Turn("assistant", text))
            self._render_answer(text, note="(stopped)")
            self._move(Phase.IDLE)
            self.stopped.emit(text)
            return
        why = answer.error
        if why is None and reply is not None:
            status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
            if status is None:
                why = unreachable_sentence(self._target.base_url if self._target else "?", self._why(reply))
            elif status != 200:
                why = error_sentence(status, bytes(answer.error_body))
            elif not answer.done:
                answer.parser.close()
                why = "The answer was cut off: the master ended the stream before it was complete."
        self._move(Phase.IDLE)
        if why is not None:
            self._drop_last_question()
            self._fail(why)
            return
        self._rate = answer.meter.rate()
        if answer.prompt_tokens is not None and answer.cached_tokens is not None:
            self.last_usage = (answer.prompt_tokens, answer.cached_tokens)
        self._history.append(Turn("assistant", text))
        self._render_answer(text)
        self.answer_finished.emit(text)

    # ------------------------------------------------------------------ rendering
    def _append_turn(self, role: Role, text: str) -> None:
        self.transcript.append_turn(role, text)

    def _render_answer(self, text: str | None = None, note: str | None = None) -> None:
        """Re-render the answer being written (``text``: the current answer's so far) and the status."""
        if text is None:
            if self._answer is None:
                return
            text = "".join(self._answer.text)
        self.transcript.render_answer(text, note)
        self._update_status()

    def _render_all(self) -> None:
        self.transcript.render_all(self._history)
        self._update_status()

    # ------------------------------------------------------------------ state
    def _move(self, to: Phase) -> None:
        self._phase = move(self._phase, to)
        self._update_controls()

    def _update_controls(self) -> None:
        serving = self._target is not None and (self._health is None or self._health.serving)
        reason = None
        if self._target is None:
            reason = "No group to chat with yet: create or join a group, or use Change… to choose a master."
        elif self._health is not None and not self._health.serving:
            reason = self._health.reason
        self.reason_label.setText(reason or "")
        self.reason_label.setVisible(reason is not None)
        self.input.setEnabled(serving)
        self.send_button.setEnabled(serving and not self.is_busy())
        self.stop_button.setEnabled(self.is_busy())
        self._update_status()

    def _update_status(self) -> None:
        pcs = self._health.pcs if self._health is not None else None
        self.status_label.setText(status_text(self._model, self._rate, pcs))

    def _fail(self, why: str) -> None:
        why = sentence(why)
        self.error_label.setText(why)
        self.error_label.show()
        log.info("chat: %s", why)
        self.failed.emit(why)

    def _drop_last_question(self) -> None:
        """Take the failed question out of the history and put it back in the input box."""
        if self._history and self._history[-1].role == "user":
            question = self._history.pop().content
            if not self.input.toPlainText().strip():
                self.input.setPlainText(question)
        self._render_all()

    def _send_clicked(self) -> None:
        if not self.send_button.isEnabled():
            return
        text = self.input.toPlainText()
        if text.strip() and self.ask(text):
            self.input.clear()

    def _target_chosen(self, target: ChatTarget) -> None:
        self.set_target(target)
        self.target_changed.emit(target)

    # ------------------------------------------------------------------ network helpers
    def _request(self, path: str, timeout_ms: int) -> QNetworkRequest:
        if self._target is None:
            raise RuntimeError("chat window: a request without a target")
        req = QNetworkRequest(QUrl(self._target.base_url + path))
        req.setTransferTimeout(timeout_ms)
        if self._target.api_key:
            req.setRawHeader(b"Authorization", f"Bearer {self._target.api_key}".encode())
        return req

    @staticmethod
    def _why(reply: QNetworkReply) -> str:
        return network_why(reply)

    # ------------------------------------------------------------------ window events
    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt override
        super().showEvent(event)
        self._poll.start()
        self.poll_health()
        self.input.setFocus()

    def hideEvent(self, event: QHideEvent) -> None:  # noqa: N802 - Qt override
        self._poll.stop()
        super().hideEvent(event)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        self._poll.stop()
        super().closeEvent(event)
