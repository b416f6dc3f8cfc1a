"""Tool calling: the tools a client offers, how the prompt shows them, and the calls in the output.

Contract
--------
:class:`ToolDef` / :data:`ToolChoice` are the parsed ``tools`` and ``tool_choice`` of a chat
body.  :func:`tool_format` reads a tokenizer's chat template once and says how its family
calls tools:

- ``TAGGED`` (Hermes, Qwen 2.5/3 and the like): the template renders ``tools`` itself
  (``apply_chat_template(tools=...)``) and the model answers with
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks;
- ``GENERIC`` (a template with no tool format, e.g. the embedded SmolLM2's): the tools are
  described in the system message (:func:`generic_system`), earlier calls are rendered as the
  same blocks inside the assistant's text and tool results as ``<tool_response>`` blocks in a
  user turn; the calls the model writes are parsed like ``TAGGED`` ones.

:func:`render_messages` applies that to template dicts (see :mod:`master_core.messages`) and
:func:`render_prompt` renders them with the tokenizer's template.
:func:`calls_grammar` is the Lark grammar of the calls a ``required`` or named choice allows
(one call, or several when ``parallel_tool_calls``), each call's arguments valid under its
function's ``parameters`` schema (llguidance's ``%json``; objects that list their properties
take no others unless the schema says so).  :func:`parse_calls` splits a
finished output into text and calls; :class:`CallStream` does the same on streamed text,
holding back what may begin a call, and yields each call once it is complete (OpenAI's
streamed ``tool_calls`` deltas: the first with id and name, then the arguments).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, Field(max_length=100_000)] | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None  # always enforced where the grammar is used


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDef


class _Named(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: _Named


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


class ToolFormat(Enum):
    TAGGED = "tagged"
    GENERIC = "generic"


def tool_format(chat_template: str | None) -> ToolFormat:
    """How a chat template's family calls tools (see the module contract)."""
    t = chat_template or ""
    if "tools" in t and OPEN in t:
        return ToolFormat.TAGGED
    return ToolFormat.GENERIC


def parameters_of(tool: ToolDef) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object", "properties": {}}


def check_tools(tools: list[ToolDef], choice: ToolChoice | None) -> None:
    """Refuse what no grammar can fix: repeated names, parameters that are no object schema, a
    named choice that names no tool (ValueError: param, reason)."""
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if t.function.name in seen:
            raise ToolError(f"tools.{i}.function.name", f"the tool {t.function.name!r} is defined twice")
        seen.add(t.function.name)
        p = parameters_of(t)
        if p.get("type", "object") != "object":
            raise ToolError(f"tools.{i}.function.parameters", "must be the JSON schema of an object")
    if isinstance(choice, NamedChoice) and choice.function.name not in seen:
        raise ToolError("tool_choice", f"names the function {choice.function.name!r}, which is not among the tools")
    if choice is not None and choice != "none" and choice != "auto" and not tools:
        raise ToolError("tool_choice", "asks for a tool call but no tools are given")


class ToolError(ValueError):
    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


def openai_tools(tools: list[ToolDef]) -> list[dict[str, Any]]:
    """The tools as transformers' ``apply_chat_template(tools=...)`` takes them."""
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def generic_system(tools: list[ToolDef]) -> str:
    """The system text that describes the tools to a model whose template has no tool format."""
    lines = [
        "You can call the following tools. To call one, answer with one block per call and nothing else:",
        f'{OPEN}{{"name": <the tool\'s name>, "arguments": <a JSON object of its arguments>}}{CLOSE}',
        "The results come back in <tool_response> blocks. The tools:",
    ]
    for t in tools:
        spec = {"name": t.function.name, "description": t.function.description or "", "parameters": parameters_of(t)}
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)


def render_messages(
    messages: list[dict[str, Any]], tools: list[ToolDef], fmt: ToolFormat
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for ``apply_chat_template``: as they are for a ``TAGGED`` template;
    for ``GENERIC`` the tools go into the system message and calls and results into text."""
    if fmt is ToolFormat.TAGGED:
        return messages, (openai_tools(tools) if tools else None)
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [
                OPEN + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}) + CLOSE
                for c in m["tool_calls"]
            ]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m["content"], *blocks]))})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):  # results of parallel calls: one turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_results", None)
    if tools:
        text = generic_system(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    ``properties`` and says nothing of others: a call fills the declared parameters only."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[ToolDef], fmt: ToolFormat) -> str:
    """The prompt text of template dicts with ``tools`` (CPU work: call it off the event loop)."""
    rendered, template_tools = render_messages(messages, tools, fmt)
    return tokenizer.apply_chat_template(rendered, tools=template_tools, add_generation_prompt=True, tokenize=False)


def _call_schema(tool: ToolDef) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": closed(parameters_of(tool))},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_grammar(tools: list[ToolDef], choice: ToolChoice, parallel: bool, fmt: ToolFormat) -> str:
    """The Lark grammar (llguidance) of the output a ``required`` or named choice allows."""
    chosen = [t for t in tools if not isinstance(choice, NamedChoice) or t.function.name == choice.function.name]
    schemas = [_call_schema(t) for t in chosen]
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}  # compact JSON (see grammar.JSON_OPTIONS)
    nl = '"\\n"' if fmt is ToolFormat.TAGGED else ""
    rules = [
        "start: call" + (' ("\\n" call)*' if parallel else ""),
        f'call: "{OPEN}" {nl} %json {json.dumps(schema)} {nl} "{CLOSE}"',
    ]
    return "\n".join(rules) + "\n"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Call:
    id: str
    name: str
    arguments: str  # JSON text
    index: int = 0  # its place among the output's calls

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(block: str, names: set[str]) -> Call | None:
    try:
        data = json.loads(block)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return Call(call_id(), data["name"], json.dumps(args, ensure_ascii=False))


def parse_calls(text: str, tools: list[ToolDef]) -> tuple[str, list[Call]]:
    """(the text outside the calls, the calls) of a finished output; a block that is not a
    valid call of a given tool stays in the text."""
    stream = CallStream(tools)
    parts = [stream.feed(text), stream.flush()]
    pieces = [x for part in parts for x in part]
    content = "".join(p for kind, p in pieces if kind == "text")
    calls = [p for kind, p in pieces if kind == "call" and isinstance(p, Call)]
    return content, calls


class CallStream:
    """Streamed output split into text and calls (see the module contract)."""

    def __init__(self, tools: list[ToolDef]) -> None:
        self.names = {t.function.name for t in tools}
        self._buf = ""
        self.calls = 0

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        """Events ``("text", str)`` and ``("call", Call)`` that ``delta`` completes."""
        self._buf += delta
        out: list[tuple[str, Any]] = []
        while self._buf:
            start = self._buf.find(OPEN)
            if start < 0:
                keep = _prefix_overlap(self._buf, OPEN)
                text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                if text:
                    out.append(("text", text))
                break
            if start:
                out.append(("text", self._buf[:start]))
                self._buf = self._buf[start:]
            end = self._buf.find(CLOSE)
            if end < 0:
                break  # the call is not complete yet
            block = self._buf[len(OPEN) : end]
            call = _call(block.strip(), self.names)
            if call is None:
                out.append(("text", self._buf[: end + len(CLOSE)]))
            else:
                call.index = self.calls
                self.calls += 1
                out.append(("call", call))
            self._buf = self._buf[end + len(CLOSE) :].lstrip("\n") if call else self._buf[end + len(CLOSE) :]
        return out

    def flush(self) -> list[tuple[str, Any]]:
        """What is left at the end (an unfinished call stays text)."""
        rest, self._buf = self._buf, ""
        return [("text", rest)] if rest else []


def _prefix_overlap(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` begin ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
