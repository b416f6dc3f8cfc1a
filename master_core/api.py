"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health.

Contract
--------
Every body is parsed once into a typed pydantic model (unknown fields, wrong types and
out-of-range values are 400s) and turned into :class:`~master_core.request.SamplingParams`.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the
status that names who is at fault (4xx: the client; 503: the group cannot serve).  Streaming
responses are Server-Sent Events ending in ``data: [DONE]``; a client that goes away cancels
its request (its KV cache is freed).  Request text is never logged, only lengths.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker_core.tasks import end_tasks

from .engine import Engine, RequestRejected
from .errors import ApiError
from .grammar import Grammar, GrammarError, Grammars, Spec, schema_spec, text_spec
from .messages import Message, MessageError, template_messages
from .request import FinishEvent, Request, SamplingParams, TokenEvent
from .tools import (
    Call,
    CallStream,
    ToolChoice,
    ToolDef,
    ToolError,
    calls_grammar,
    check_tools,
    parameters_of,
    parse_calls,
    render_prompt,
    tool_format,
)
from .turn_ids import TurnIds

log = logging.getLogger("molink.api")


# --------------------------------------------------------------------------- bodies

StopField = (
    None
    | Annotated[str, Field(max_length=256)]
    | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=8)]
)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, Field(max_length=100_000)] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always enforced


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1, le=8)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    ignore_eos: bool = False  # extension (as in vLLM): generate exactly max_tokens
    response_format: ResponseFormat | None = None
    # sent by common clients and harmless to ignore here (README: "The API")
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # refused unless empty (they would change the output and are not implemented)
    logit_bias: dict[str, Any] | None = None


class CompletionBody(_Common):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: Literal[False] = False
    regex: str | None = None  # extension: the output matches this regular expression
    grammar: str | None = None  # extension: the output is a sentence of this Lark grammar (llguidance)


class ChatBody(_Common):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None  # ignored: the models served here do not reason apart
    modalities: list[Literal["text"]] | None = None  # only text


Body = TypeVar("Body", bound=_Common)


# --------------------------------------------------------------------------- handlers


class Api:
    def __init__(self, engine: Engine, model_id: str) -> None:
        self.engine = engine
        self.model_id = model_id
        self.created = int(time.time())
        self.grammars = Grammars(engine.tokenizer, engine.group.dims.vocab_size, engine.eos_ids)
        self.tool_format = tool_format(getattr(engine.tokenizer, "chat_template", None))
        self.turn_ids = TurnIds()  # earlier answers' generated ids: a conversation's prompt keeps its prefix

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
        ]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "molink"}

    async def health(self, request: web.Request) -> web.Response:
        g = self.engine.group
        body = {
            "status": "ok" if g.serving else "unavailable",
            "state": g.state.value,
            "problem": g.problem,
            "model": self.model_id,
            "epoch": g.epoch,
            "workers": g.describe(),
            "running": len(self.engine.running),
            "queued": len(self.engine.waiting),
            "tokens_generated": self.engine.tokens_generated,
            "cached_prefixes": len(self.engine.kv.prefix),  # ended requests' caches kept on every stage for reuse
            "standby_copy": self.engine.shadow.describe(),  # a standby member's copy of the caches (master_core.shadow)
            "stage_copies": self.engine.copies.behind(),  # per copy a stage keeps: positions it lacks
        }
        return web.json_response(body, status=200 if g.serving else 503)

    async def _parse(self, request: web.Request, cls: type[Body]) -> Body:
        try:
            raw = await asyncio.wait_for(request.read(), self.engine.config.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {self.engine.config.body_timeout:.0f} s",
                code="request_timeout",
            ) from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not valid UTF-8") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
        if body.model != self.model_id:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this group serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )
        return body

    async def _compile(self, spec: Spec, param: str) -> Grammar:
        try:
            return await self.grammars.compile(spec)
        except GrammarError as e:
            raise ApiError(400, f"{param}: {e}", param=param, code="invalid_grammar") from None

    async def _response_grammar(self, body: _Common) -> Grammar | None:
        """The grammar of ``response_format`` (and, on completions, of ``regex`` / ``grammar``)."""
        specs: list[tuple[str, Spec]] = []
        try:
            rf = body.response_format
            if rf is not None and rf.type == "json_object":
                specs.append(("response_format", Spec("json_object")))
            elif rf is not None and rf.type == "json_schema":
                if rf.json_schema is None or rf.json_schema.schema_ is None:
                    raise ApiError(400, "response_format.json_schema.schema is required", param="response_format")
                specs.append(("response_format.json_schema.schema", schema_spec(rf.json_schema.schema_)))
            if isinstance(body, CompletionBody):
                if body.regex is not None:
                    specs.append(("regex", text_spec("regex", body.regex)))
                if body.grammar is not None:
                    specs.append(("grammar", text_spec("lark", body.grammar)))
        except GrammarError as e:
            param = specs[-1][0] if specs else "response_format"
            raise ApiError(400, f"{param}: {e}", param=param, code="invalid_grammar") from None
        if len(specs) > 1:
            names = ", ".join(p.split(".")[0] for p, _ in specs)
            raise ApiError(400, f"give one of {names}, not several", param=specs[1][0])
        return await self._compile(specs[0][1], specs[0][0]) if specs else None

    def _params(
        self, body: _Common, max_tokens: int | None, logprobs: int | None, grammar: Grammar | None = None
    ) -> SamplingParams:
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        cfg = self.engine.config
        mt = max_tokens if max_tokens is not None else cfg.default_max_tokens
        if mt > cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {mt} exceeds the limit of {cfg.max_tokens_limit}", param="max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(
            max_tokens=mt,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=logprobs,
            grammar=grammar,
        )

    def _submit_n(self, prompt: list[int], params: SamplingParams, n: int) -> list[Request]:
        """Submit ``n`` choices (seeds seed, seed+1, ...); all or none are queued."""
        reqs: list[Request] = []
        try:
            for i in range(n):
                p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                reqs.append(self._submit(prompt, p))
        except ApiError:
            for r in reqs:
                self.engine.cancel(r)
            raise
        return reqs

    def _submit(self, prompt: list[int], params: SamplingParams) -> Request:
        g = self.engine.group
        if not g.serving and (len(g.live_links()) < self.engine.config.min_workers or not g.state.building):
            # no pipeline and none being built (a re-plan in progress queues the request instead)
            raise ApiError(
                503,
                f"the group cannot serve now: {g.problem or 'no pipeline'}",
                "service_unavailable",
                retry_after=self.engine.config.retry_after,
            )
        vocab = g.dims.vocab_size
        if any(t >= vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
        try:
            return self.engine.submit(prompt, params)
        except RequestRejected as e:
            raise ApiError(
                e.status, str(e), "invalid_request_error" if e.status < 429 else "rate_limit_error", code=e.code
            ) from None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionBody = await self._parse(request, CompletionBody)
        prompt = body.prompt
        if not isinstance(prompt, list):  # tokenizing a body of up to 4 MiB: off the event loop
            prompt = (await asyncio.to_thread(self.engine.tokenizer, prompt))["input_ids"]
        grammar = await self._response_grammar(body)
        params = self._params(body, body.max_tokens, body.logprobs, grammar)
        reqs = self._submit_n(list(prompt), params, body.n or 1)
        return await self._respond(request, reqs, body, f"cmpl-{uuid.uuid4().hex}", chat=False)

    async def _tools_grammar(self, body: ChatBody) -> Grammar | None:
        """Check the tools (every ``parameters`` schema compiles) and give the grammar of the
        calls a ``required`` or named ``tool_choice`` asks for."""
        tools, choice = body.tools or [], body.tool_choice
        try:
            check_tools(tools, choice)
        except ToolError as e:
            raise ApiError(400, str(e), param=e.param) from None
        for i, t in enumerate(tools):
            param = f"tools.{i}.function.parameters"
            try:
                spec = schema_spec(parameters_of(t))
            except GrammarError as e:
                raise ApiError(400, f"{param}: {e}", param=param, code="invalid_grammar") from None
            await self._compile(spec, param)
        if not tools or choice is None or choice in ("none", "auto"):
            return None
        if body.response_format is not None and body.response_format.type != "text":
            raise ApiError(400, "response_format cannot be combined with a required tool call", param="tool_choice")
        try:
            spec = text_spec("lark", calls_grammar(tools, choice, body.parallel_tool_calls, self.tool_format))
        except GrammarError as e:
            raise ApiError(400, f"tools: {e}", param="tools", code="invalid_grammar") from None
        return await self._compile(spec, "tools")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatBody = await self._parse(request, ChatBody)
        try:
            messages = template_messages(body.messages)
        except MessageError as e:
            raise ApiError(400, str(e), param=e.param) from None
        tools = body.tools or []
        grammar = await self._tools_grammar(body) or await self._response_grammar(body)
        try:
            text = await asyncio.to_thread(  # template and tokenizer run off the event loop (bodies up to 4 MiB)
                render_prompt, self.engine.tokenizer, messages, tools, self.tool_format
            )
        except Exception as e:  # template errors (e.g. roles the template refuses)
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        prompt = await asyncio.to_thread(self.turn_ids.ids, text, self._tokenize)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        reqs = self._submit_n(list(prompt), self._params(body, max_tokens, logprobs, grammar), body.n or 1)
        calling = tools if tools and body.tool_choice != "none" else []
        resp = await self._respond(request, reqs, body, f"chatcmpl-{uuid.uuid4().hex}", chat=True, tools=calling)
        if len(reqs) == 1 and not calling and reqs[0].finish_reason in ("stop", "length"):
            await asyncio.to_thread(self._remember, text, reqs[0])
        return resp

    def _tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _remember(self, text: str, req: Request) -> None:
        """Keep this answer's ids for the conversation's next turn (master_core.turn_ids)."""
        out = list(req.output)
        while out and out[-1] in self.engine.eos_ids:
            out.pop()
        answer = self.engine.tokenizer.decode(out, skip_special_tokens=False)
        self.turn_ids.remember(text, req.prompt, answer, out)

    # ------------------------------------------------------------------ responses
    def _usage(self, reqs: list[Request]) -> dict:
        p, c = len(reqs[0].prompt), sum(len(r.output) for r in reqs)
        cached = reqs[0].cached_tokens  # prompt tokens reused from the prefix cache (OpenAI's field)
        return {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _logprob_entry(self, ev: TokenEvent) -> dict:
        tok = self.engine.tokenizer.convert_ids_to_tokens(ev.token_id) if ev.token_id >= 0 else ""
        top = [
            {"token": self.engine.tokenizer.convert_ids_to_tokens(i), "logprob": lp}
            for i, lp in (ev.top_logprobs or [])
        ]
        return {"token": tok, "logprob": ev.logprob, "top_logprobs": top}

    async def _events(self, reqs: list[Request]) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
        """Events of all choices as they come, tagged with the choice index."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, r: Request) -> None:
            while True:
                ev = await r.events.get()
                await merged.put((i, ev))
                if isinstance(ev, FinishEvent):
                    return

        pumps = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            left = len(reqs)
            while left:
                i, ev = await merged.get()
                left -= isinstance(ev, FinishEvent)
                yield i, ev
        finally:
            await end_tasks(pumps)

    async def _respond(
        self,
        request: web.Request,
        reqs: list[Request],
        body: _Common,
        rid: str,
        chat: bool,
        tools: list[ToolDef] | None = None,
    ) -> web.StreamResponse:
        try:
            if body.stream:
                return await self._stream(request, reqs, body, rid, chat, tools or [])
            return await self._collect(reqs, rid, chat, tools or [])
        finally:
            for r in reqs:
                self.engine.cancel(r)  # no-op when finished; frees the KV cache if the client left

    async def _collect(self, reqs: list[Request], rid: str, chat: bool, tools: list[ToolDef]) -> web.Response:
        texts: list[list[str]] = [[] for _ in reqs]
        lps: list[list[dict]] = [[] for _ in reqs]
        reasons: list[str] = ["" for _ in reqs]  # every choice ends with one FinishEvent
        failed: FinishEvent | None = None
        async for i, ev in self._events(reqs):
            if isinstance(ev, FinishEvent):
                reasons[i] = ev.reason
                if ev.reason == "error" and failed is None:
                    failed = ev
                continue
            texts[i].append(ev.text)
            if ev.logprob is not None and ev.token_id >= 0:
                lps[i].append(self._logprob_entry(ev))
        if failed is not None:
            raise _failure(failed)
        choices = []
        for i, r in enumerate(reqs):
            text, reason = "".join(texts[i]), reasons[i]
            if chat:
                lp: Any = {"content": lps[i]} if r.params.logprobs is not None else None
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if tools:
                    content, calls = parse_calls(text, tools)
                    if calls:
                        message = {"role": "assistant", "content": content.strip() or None}
                        message["tool_calls"] = [c.message() for c in calls]
                        reason = "tool_calls" if reason == "stop" else reason
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            else:
                lp = _legacy_logprobs(lps[i]) if r.params.logprobs is not None else None
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": choices,
                "usage": self._usage(reqs),
            }
        )

    async def _stream(
        self, request: web.Request, reqs: list[Request], body: _Common, rid: str, chat: bool, tools: list[ToolDef]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))

        async def send(choice: dict | None, usage: dict | None = None) -> None:
            payload: dict = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.model_id,
                "choices": [choice] if choice else [],
            }
            if include_usage:
                payload["usage"] = usage
            await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

        try:
            if chat:
                for i in range(len(reqs)):
                    await send(
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    )
            error: FinishEvent | None = None
            splits = [CallStream(tools) for _ in reqs] if tools else []
            async for i, ev in self._events(reqs):
                if isinstance(ev, FinishEvent):
                    if ev.reason == "error":
                        error = error or ev
                        continue
                    reason = ev.reason
                    if splits:
                        await self._send_split(send, i, splits[i], splits[i].flush())
                        reason = "tool_calls" if splits[i].calls and reason == "stop" else reason
                    final: dict = {"index": i, "finish_reason": reason, "logprobs": None}
                    final.update({"delta": {}} if chat else {"text": ""})
                    await send(final)
                    continue
                if not ev.text and ev.logprob is None:
                    continue
                lp = self._logprob_entry(ev) if ev.logprob is not None and ev.token_id >= 0 else None
                if splits:
                    await self._send_split(send, i, splits[i], splits[i].feed(ev.text), lp)
                elif chat:
                    await send(
                        {
                            "index": i,
                            "delta": {"content": ev.text},
                            "logprobs": {"content": [lp]} if lp else None,
                            "finish_reason": None,
                        }
                    )
                else:
                    await send(
                        {
                            "index": i,
                            "text": ev.text,
                            "logprobs": _legacy_logprobs([lp]) if lp else None,
                            "finish_reason": None,
                        }
                    )
            if error is not None:
                await resp.write(f"data: {json.dumps(_failure(error).body())}\n\n".encode())
            elif include_usage:
                await send(None, self._usage(reqs))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            log.info("client left during a streamed request; cancelled")
        return resp

    @staticmethod
    async def _send_split(
        send: Any, i: int, split: CallStream, events: list[tuple[str, Any]], lp: dict | None = None
    ) -> None:
        """Streamed chat deltas of one choice that may call tools: text as ``content``, each
        complete call as OpenAI sends it (id, type and name first, then the arguments)."""
        lps = {"content": [lp]} if lp else None
        for kind, value in events:
            if kind == "text":
                delta: dict = {"content": value}
                await send({"index": i, "delta": delta, "logprobs": lps, "finish_reason": None})
                lps = None
                continue
            call: Call = value
            k = call.index
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            await send({"index": i, "delta": {"tool_calls": [head]}, "logprobs": lps, "finish_reason": None})
            lps = None
            args = {"index": k, "function": {"arguments": call.arguments}}
            await send({"index": i, "delta": {"tool_calls": [args]}, "logprobs": None, "finish_reason": None})
        if lps:  # a token that completed nothing yet still reports its logprob
            await send({"index": i, "delta": {}, "logprobs": lps, "finish_reason": None})


def _failure(ev: FinishEvent) -> ApiError:
    """The 503 of a request that ended with an error: the group could not serve it (then with
    Retry-After and the code ``group_unavailable``), or its steps kept failing."""
    if ev.retry_after is not None:
        return ApiError(503, str(ev.error), "service_unavailable", code="group_unavailable", retry_after=ev.retry_after)
    return ApiError(503, f"the request failed in the pipeline: {ev.error}", "service_unavailable")


def _legacy_logprobs(entries: list[dict]) -> dict:
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": [],
    }


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure becomes an OpenAI-shaped JSON error; nothing escapes as an HTML page."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPRequestEntityTooLarge:
        return ApiError(413, "the request body is too large", code="request_too_large").response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return ApiError(e.status, e.reason or "error").response()
    except Exception:
        log.exception("internal error on %s", request.path)
        return ApiError(500, "internal error", "server_error").response()
