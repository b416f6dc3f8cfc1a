"""An incremental Server-Sent Events parser: bytes in, events out (pure, no I/O, no Qt).

Contract
--------
``SseParser().feed(chunk)`` takes the bytes of a ``text/event-stream`` body in any slicing
(a line, a character, even a CRLF pair may be cut between two chunks) and returns the events
completed by that chunk, in order:

* :class:`DataEvent` -- an event whose ``data`` is a JSON object (``{"choices": ...}``);
* :class:`DoneEvent` -- the ``data: [DONE]`` marker that ends an OpenAI stream;
* :class:`ErrorEvent` -- an event the parser could not read (data that is not JSON, not a JSON
  object, not UTF-8, or a line longer than ``max_line`` bytes), with one sentence saying why.

Lines end with LF, CRLF or CR (the SSE rules).  An event is dispatched at a blank line; its
``data:`` lines are joined with LF (one optional space after the colon is dropped).  Comment
lines (``: keep-alive``) and other fields (``event``, ``id``, ``retry``) are ignored.  An
event without any ``data`` line dispatches nothing.  ``feed`` never raises on any input;
``close()`` ends the stream and, as the SSE rules say, drops an event that was not
terminated by a blank line (it returns ``True`` when such a partial event was pending).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20  # bytes: a longer line is reported as an error and skipped


@dataclass(frozen=True)
class DataEvent:
    data: dict[str, Any]  # the event's JSON object


@dataclass(frozen=True)
class DoneEvent:
    pass


@dataclass(frozen=True)
class ErrorEvent:
    message: str  # one sentence, e.g. "the stream sent data that is not JSON: ..."


SseEvent = DataEvent | DoneEvent | ErrorEvent


class SseParser:
    """Feed it the body as it arrives; it keeps the partial line and the pending event's data."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()  # the current line, not yet terminated
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._skipping = False  # inside an over-long line: drop bytes until its end
        self._data: list[str] | None = None  # data lines of the pending event (None: none yet)
        self._broken: str | None = None  # the pending event is unreadable (why)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        out: list[SseEvent] = []
        i, n = 0, len(chunk)
        if self._skip_lf and n:
            self._skip_lf = False
            if chunk[0:1] == b"\n":
                i = 1
        while i < n:
            cr, lf = chunk.find(b"\r", i), chunk.find(b"\n", i)
            ends = [p for p in (cr, lf) if p >= 0]
            if not ends:
                self._append(chunk[i:], out)
                break
            end = min(ends)
            self._append(chunk[i:end], out)
            self._end_line(out)
            i = end + 1
            if chunk[end : end + 1] == b"\r":
                if i < n:
                    if chunk[i : i + 1] == b"\n":
                        i += 1
                else:
                    self._skip_lf = True
        return out

    def close(self) -> bool:
        """End of the body: drop what is unterminated; True if a partial event was dropped."""
        partial = bool(self._buf) or self._data is not None or self._broken is not None
        self._buf.clear()
        self._data, self._broken, self._skipping, self._skip_lf = None, None, False, False
        return partial

    # ------------------------------------------------------------------ lines
    def _append(self, part: bytes, out: list[SseEvent]) -> None:
        if self._skipping:
            return
        self._buf += part
        if len(self._buf) > self.max_line:
            self._buf.clear()
            self._skipping = True
            self._broken = f"the stream sent a line longer than {self.max_line} bytes"

    def _end_line(self, out: list[SseEvent]) -> None:
        if self._skipping:
            self._skipping = False
            return
        raw = bytes(self._buf)
        self._buf.clear()
        if not raw:
            self._dispatch(out)
            return
        if raw.startswith(b":"):
            return  # a comment (keep-alive)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._broken = "the stream sent bytes that are not UTF-8"
            return
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            if self._data is None:
                self._data = []
            self._data.append(value)
        # other fields (event, id, retry) and unknown ones: ignored

    def _dispatch(self, out: list[SseEvent]) -> None:
        data, broken = self._data, self._broken
        self._data, self._broken = None, None
        if broken is not None:
            out.append(ErrorEvent(broken))
            return
        if data is None:
            return
        out.append(parse_data("\n".join(data)))


def parse_data(text: str) -> SseEvent:
    """One event's data: the ``[DONE]`` marker, a JSON object, or why it is neither."""
    if text.strip() == "[DONE]":
        return DoneEvent()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        return ErrorEvent(f"the stream sent data that is not JSON ({_short(str(e))})")
    if not isinstance(value, dict):
        return ErrorEvent(f"the stream sent a JSON {type(value).__name__} where an object was expected")
    return DataEvent(value)


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
