"""The chat messages clients send, parsed once into typed form and made ready for a chat template.

Contract
--------
:data:`Message` is one entry of a chat body's ``messages`` (a pydantic union on ``role``):
``system``/``developer`` (``developer`` is rendered as ``system``), ``user``, ``assistant``
(``content`` may be empty or null when it carries ``tool_calls``) and ``tool`` (the answer to
a call, by ``tool_call_id``).  ``content`` is a string or a list of text parts
(``[{"type": "text", "text": ...}]``, joined with no separator); any other part (images,
audio, files) is refused with its type named, since the group serves a text model.  Fields
that clients send back and that change nothing here (``refusal``, ``reasoning_content``,
``annotations``, a tool message's ``name``) are accepted and dropped; any other field is
refused by name.

:func:`template_messages` checks what only the whole list shows (every ``tool`` message
answers a call made earlier; a call's ``arguments`` are a JSON object) and returns the plain
dicts transformers' ``apply_chat_template`` takes: ``{"role", "content"}``, plus
``tool_calls`` (``arguments`` as a dict, as templates expect) and a tool message's
``tool_call_id`` and ``name``.  Raises :class:`MessageError` (param, reason) for a 400.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CONTENT = 10_000_000  # characters of one message
MAX_PARTS = 256  # text parts of one message

Name = Annotated[str, Field(max_length=64)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_CONTENT)]


Content = Annotated[str, Field(max_length=MAX_CONTENT)] | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]


def _only_text(value: Any) -> Any:
    if isinstance(value, list):
        for part in value:
            if isinstance(part, dict) and part.get("type") not in (None, "text"):
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported: this model reads text")
    return value


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("content", mode="before", check_fields=False)
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        return _only_text(value)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content
    name: Name | None = None


class UserMessage(_Message):
    role: Literal["user"]
    content: Content
    name: Name | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: Annotated[str, Field(max_length=MAX_CONTENT)]  # JSON text, as the API returned it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # sent back by some clients that accumulated streamed deltas; ignored


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    name: Name | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=64)] | None = None
    refusal: str | None = None  # ignored
    reasoning_content: str | None = None  # ignored (some clients send a reasoning model's thoughts back)
    annotations: list[Any] | None = None  # ignored


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Name | None = None  # ignored: the call it answers names the function


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class MessageError(ValueError):
    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param


def text_of(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The messages as chat-template dicts (see the module contract)."""
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # tool call id -> function name, of the calls made so far
    for i, m in enumerate(messages):
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": text_of(m.content)})
        elif isinstance(m, UserMessage):
            out.append({"role": "user", "content": text_of(m.content)})
        elif isinstance(m, AssistantMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": text_of(m.content)}
            if m.tool_calls:
                entry["tool_calls"] = []
                for j, call in enumerate(m.tool_calls):
                    param = f"messages.{i}.tool_calls.{j}.function.arguments"
                    try:
                        args = json.loads(call.function.arguments or "{}")
                    except (json.JSONDecodeError, RecursionError):
                        raise MessageError(param, "not valid JSON") from None
                    if not isinstance(args, dict):
                        raise MessageError(param, "must be a JSON object")
                    calls[call.id] = call.function.name
                    entry["tool_calls"].append(
                        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}
                    )
            out.append(entry)
        elif isinstance(m, ToolMessage):
            name = calls.get(m.tool_call_id)
            if name is None:
                raise MessageError(
                    f"messages.{i}.tool_call_id",
                    f"no earlier assistant message made the tool call {m.tool_call_id!r} this message answers",
                )
            out.append({"role": "tool", "content": text_of(m.content), "tool_call_id": m.tool_call_id, "name": name})
    return out
