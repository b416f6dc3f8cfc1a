"""The chat window's side without Qt: whom it talks to, what it sends, how it reads the answers.

Contract: pure functions and small value types, tested without a display.  ``parse_target``
turns what the user typed into a :class:`ChatTarget`; ``chat_body`` is the request of one turn
(the whole history); ``read_chunk`` reads one streamed chunk of ``/v1/chat/completions``;
``error_sentence`` / ``unreachable_sentence`` / ``sentence`` say a failure in one sentence;
``parse_health`` reads ``/health`` into a :class:`HealthView`; :class:`TokenMeter` and
``status_text`` make the status line; ``transcript_markdown`` is what Copy puts on the clipboard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from master_core.config import MasterConfig

DEFAULT_MAX_TOKENS = 512  # answer length limit sent with each turn
MAX_ERROR_BODY = 64 * 1024  # bytes of an HTTP error body kept to read its message
DEFAULT_PORT = MasterConfig.port  # the API port when an address has none

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class ChatTarget:
    base_url: str  # e.g. "http://127.0.0.1:8000", no trailing slash
    api_key: str | None = None  # sent as "Authorization: Bearer <key>"


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


def parse_target(address: str, api_key: str | None = None) -> ChatTarget:
    """What the user typed (``host``, ``host:port``, ``http(s)://host:port``) as a target, or ValueError."""
    text = address.strip()
    if not text:
        raise ValueError("Type the master's address, for example 192.168.1.20:8000.")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"The address must start with http:// or https://, not {parts.scheme}://.")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("The port in that address is not a number between 0 and 65535.") from None
    host = parts.hostname
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{address.strip()!r} is not an address of a master.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("Give only the master's address and port, without a path.")
    netloc = f"[{host}]" if ":" in host else host
    port = port if port is not None else (DEFAULT_PORT if parts.scheme == "http" else 443)
    key = (api_key or "").strip() or None
    return ChatTarget(f"{parts.scheme}://{netloc}:{port}", key)


def chat_body(
    model: str, history: list[Turn], max_tokens: int = DEFAULT_MAX_TOKENS, extra: dict[str, Any] | None = None
) -> dict:
    """The streamed chat request for the whole history; ``extra`` fields (e.g. ``temperature``) win."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": t.role, "content": t.content} for t in history],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra or {})
    return body


@dataclass(frozen=True)
class Chunk:
    """What one streamed ``chat.completion.chunk`` (or an error event) says."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the final usage chunk
    error: str | None = None  # one sentence
    prompt_tokens: int | None = None  # from the final usage chunk
    cached_tokens: int | None = None  # prompt tokens the group reused from its prefix cache (usage chunk)


def read_chunk(data: dict) -> Chunk:
    """Read the first choice's text, the finish reason, usage, or an ``{"error": ...}`` event."""
    err = data.get("error")
    if err is not None:
        msg = err.get("message") if isinstance(err, dict) else err
        why = f"The group failed while answering: {msg}" if msg else "The group failed while answering"
        return Chunk(error=sentence(why))
    text, finish = "", None
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            text = delta["content"]
        if isinstance(choice.get("finish_reason"), str):
            finish = choice["finish_reason"]
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    return Chunk(
        text=text,
        finish_reason=finish,
        completion_tokens=_count(usage.get("completion_tokens")),
        prompt_tokens=_count(usage.get("prompt_tokens")),
        cached_tokens=_count(details.get("cached_tokens")),
    )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def sentence(text: str, limit: int = 300) -> str:
    """One line, one sentence: whitespace folded, bounded, ending with a full stop."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    if text and text[-1] not in ".!?…":
        text += "."
    return text[:1].upper() + text[1:]


def error_sentence(status: int, body: bytes) -> str:
    """An HTTP error answer (OpenAI's ``{"error": {"message": ...}}`` or anything else) as one sentence."""
    msg = None
    try:
        data = json.loads(body.decode("utf-8"))
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
    except (ValueError, RecursionError):
        pass
    if status == 401:
        return sentence(f"The master refused the API key ({msg or 'HTTP 401'}); use Change… to enter the right one")
    if status in (429, 503):
        return sentence(f"The group cannot answer now: {msg or f'HTTP {status}'}")
    if msg:
        return sentence(f"The master refused the request (HTTP {status}): {msg}")
    return sentence(f"The master answered HTTP {status}")


def unreachable_sentence(base_url: str, why: str | None = None) -> str:
    return sentence(f"Cannot reach the master at {base_url}" + (f" ({why})" if why else ""))


@dataclass(frozen=True)
class HealthView:
    serving: bool
    reason: str | None = None  # one sentence when not serving
    pcs: int = 0  # workers that hold a pipeline stage
    model: str | None = None


def parse_health(status: int | None, body: bytes, base_url: str, network_error: str | None = None) -> HealthView:
    """A ``/health`` answer (status None: no HTTP answer at all) as what the window shows."""
    if status is None:
        return HealthView(False, unreachable_sentence(base_url, network_error))
    if status in (401, 403):
        return HealthView(False, error_sentence(status, body))
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return HealthView(False, sentence(f"The master at {base_url} sent an unreadable health answer (HTTP {status})"))
    workers = data.get("workers")
    workers = workers if isinstance(workers, list) else []
    pcs = sum(1 for w in workers if isinstance(w, dict) and isinstance(w.get("stage"), int))
    model = data.get("model") if isinstance(data.get("model"), str) else None
    if status == 200 and data.get("status") == "ok":
        return HealthView(True, None, pcs, model)
    problem = data.get("problem")
    why = sentence(f"The group cannot answer now: {problem}" if problem else "The group cannot answer now")
    return HealthView(False, why, pcs, model)


@dataclass
class TokenMeter:
    """Tokens/s of one answer: pieces counted as they arrive, over the time from the first to the last.

    Times are in seconds (any monotonic clock); the usage count of the final chunk, when the
    master sends one, replaces the piece count.
    """

    first: float | None = None
    last: float | None = None
    pieces: int = 0
    final_tokens: int | None = None

    def token(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.pieces += 1

    def rate(self) -> float | None:
        """tokens/s, or None before two tokens (one token has no duration)."""
        tokens = self.final_tokens if self.final_tokens is not None else self.pieces
        if self.first is None or self.last is None or tokens < 2 or self.last <= self.first:
            return None
        return (tokens - 1) / (self.last - self.first)


def status_text(model: str | None, rate: float | None, pcs: int | None) -> str:
    parts = [f"Model: {model}" if model else "Model: …"]
    if rate is not None:
        parts.append(f"{rate:.1f} tokens/s")
    if pcs:
        parts.append(f"served by {pcs} PC" + ("" if pcs == 1 else "s"))
    return " · ".join(parts)


def transcript_markdown(history: list[Turn], last_only: bool = False) -> str:
    """The conversation (or its last answer) as Markdown text."""
    if last_only:
        answers = [t.content for t in history if t.role == "assistant"]
        return answers[-1] if answers else ""
    return "\n\n".join(f"**{'You' if t.role == 'user' else 'Assistant'}:**\n\n{t.content}" for t in history)
