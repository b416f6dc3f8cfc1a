"""One streamed chat answer and the chat window's phases: what the window reads from the network.

Contract
--------
* :class:`Phase` is the chat window's state (idle, connecting: asking for the model name,
  streaming an answer); :func:`move` is its one transition table and raises ``RuntimeError`` on a
  move it does not allow.
* :class:`Answer` is the answer being streamed: its reply, its SSE parser, the text so far, the
  tokens/s meter and how it ended.  :meth:`Answer.pieces` feeds the bytes of one ``readyRead``
  through the parser and yields each text piece as it is added (marking ``done`` on ``[DONE]`` and
  ``error`` with one sentence on an error event or an unreadable chunk; it stops at the first
  error).  :meth:`Answer.keep_error_body` keeps at most ``MAX_ERROR_BODY`` bytes of a failed
  reply's body for its error sentence.
* :func:`network_why` is a failed reply's reason in a few words (``connection refused``, ...).

No widgets; Qt only for the reply type.  The text, chunk and error helpers are :mod:`.chat_text`,
the SSE framing :mod:`.sse`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from PySide6.QtNetwork import QNetworkReply

from .chat_text import MAX_ERROR_BODY, TokenMeter, read_chunk, sentence
from .sse import DataEvent, DoneEvent, ErrorEvent, SseParser


class Phase(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"  # asking /v1/models for the model name before the first turn
    STREAMING = "streaming"


_MOVES: dict[Phase, set[Phase]] = {
    Phase.IDLE: {Phase.CONNECTING, Phase.STREAMING},
    Phase.CONNECTING: {Phase.STREAMING, Phase.IDLE},
    Phase.STREAMING: {Phase.IDLE},
}


def move(frm: Phase, to: Phase) -> Phase:
    """``to``, if the chat window may go there from ``frm``; else ``RuntimeError``."""
    if to not in _MOVES[frm]:
        raise RuntimeError(f"chat window: no move from {frm.value} to {to.value}")
    return to


@dataclass
class Answer:
    """The answer being streamed."""

    reply: QNetworkReply | None = None
    parser: SseParser = field(default_factory=SseParser)
    text: list[str] = field(default_factory=list)
    meter: TokenMeter = field(default_factory=TokenMeter)
    done: bool = False  # [DONE] arrived
    error: str | None = None  # the stream said it failed, or could not be read
    error_body: bytearray = field(default_factory=bytearray)
    stopping: bool = False
    prompt_tokens: int | None = None  # the usage chunk's: the prompt's tokens ...
    cached_tokens: int | None = None  # ... and how many of them the group's prefix cache held

    def keep_error_body(self, data: bytes) -> None:
        room = MAX_ERROR_BODY - len(self.error_body)
        self.error_body += data[: max(room, 0)]

    def pieces(self, data: bytes) -> Iterator[str]:
        """The text pieces ``data`` adds, each yielded once it is part of the answer; stops at an error."""
        for event in self.parser.feed(data):
            if isinstance(event, DoneEvent):
                self.done = True
            elif isinstance(event, ErrorEvent):
                self.error = sentence(f"The master sent a stream the chat cannot read: {event.message}")
            elif isinstance(event, DataEvent):
                chunk = read_chunk(event.data)
                if chunk.error:
                    self.error = chunk.error
                if chunk.completion_tokens is not None:
                    self.meter.final_tokens = chunk.completion_tokens
                if chunk.prompt_tokens is not None:
                    self.prompt_tokens = chunk.prompt_tokens
                if chunk.cached_tokens is not None:
                    self.cached_tokens = chunk.cached_tokens
                if chunk.text:
                    self.text.append(chunk.text)
                    self.meter.token(time.monotonic())
                    yield chunk.text
            if self.error is not None:
                return


_NETWORK_WHY = {
    QNetworkReply.NetworkError.ConnectionRefusedError: "connection refused",
    QNetworkReply.NetworkError.HostNotFoundError: "unknown host",
    QNetworkReply.NetworkError.TimeoutError: "no answer in time",
    QNetworkReply.NetworkError.OperationCanceledError: "no answer in time",
    QNetworkReply.NetworkError.RemoteHostClosedError: "the master closed the connection",
    QNetworkReply.NetworkError.SslHandshakeFailedError: "the TLS handshake failed",
    QNetworkReply.NetworkError.NetworkSessionFailedError: "no network",
}


def network_why(reply: QNetworkReply) -> str:
    return _NETWORK_WHY.get(reply.error(), reply.errorString())
