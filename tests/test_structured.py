"""Structured outputs and tool calls through a real 3-stage group, with the openai SDK: parsed
Pydantic objects, JSON modes, regex and grammar extensions, a two-step tool loop streamed and
not, the same greedy output under a schema with the loop-back on and off, the message forms
clients send, and bad input refused with its reason while serving goes on."""

import json
import re
from typing import Literal

import openai
import pytest
from harness import Cluster, run
from pydantic import BaseModel, Field
from tiny_models import TOOL_FAMILIES, make_tiny_checkpoint
from transformers import AutoTokenizer

from master_core.messages import UserMessage, template_messages
from master_core.tools import ToolDef, render_prompt, tool_format

KEY = "sk-test-structured"
BIG_CONTEXT = {"max_position_embeddings": 2048}  # the generic tool prompt alone is ~400 tiny tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("so") / "qwen2", seed=5, config=BIG_CONTEXT)


@pytest.fixture(scope="module")
def generic_ckpt(tmp_path_factory):  # a family whose template has no tool format
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("so") / "llama", seed=7, config=BIG_CONTEXT)


def with_client(ckpt, fn, **master):
    async def main():
        async with Cluster(ckpt, workers=3, api_key=KEY, **master) as c:
            client = openai.AsyncOpenAI(base_url=c.base_url + "/v1", api_key=KEY, max_retries=0)
            try:
                return await fn(c, client)
            finally:
                await client.close()

    return run(main())


class Reading(BaseModel):
    station: str = Field(max_length=10)
    level: Literal["low", "mid", "high"]
    count: int
    ok: bool


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}},
    },
}


def test_parse_json_modes_regex_and_grammar(ckpt):
    async def fn(c, client):
        model = c.master.model_id
        msgs = [{"role": "user", "content": "a reading please"}]
        r = await client.chat.completions.parse(
            model=model, messages=msgs, response_format=Reading, max_tokens=400, temperature=0
        )
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Reading) and r.choices[0].finish_reason == "stop", r
        # sampled too: every seed gives a valid object
        for seed in range(3):
            r = await client.chat.completions.parse(
                model=model, messages=msgs, response_format=Reading, max_tokens=400, temperature=1.0, seed=seed
            )
            assert isinstance(r.choices[0].message.parsed, Reading)
        # json_object: some JSON object
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        r = await client.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=400,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
        )
        value = json.loads(r.choices[0].message.content)
        assert isinstance(value, dict) and isinstance(value["n"], int)
        # completions: response_format, and the regex and grammar extensions
        r = await client.completions.create(
            model=model,
            prompt="the group",
            max_tokens=400,
            temperature=0,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}},
        )
        assert isinstance(json.loads(r.choices[0].text)["n"], int)
        r = await client.completions.create(
            model=model, prompt="the group", max_tokens=40, temperature=0, extra_body={"regex": "[0-9]{3}-[a-z]{2,4}"}
        )
        assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", r.choices[0].text), r.choices[0].text
        lark = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/\n'
        r = await client.completions.create(
            model=model, prompt="the group", max_tokens=40, temperature=0.8, seed=3, extra_body={"grammar": lark}
        )
        assert re.fullmatch("yes|no|maybe [0-9]", r.choices[0].text), r.choices[0].text
        assert c.engine.held() == {"running": 0, "waiting": 0, "text_streams": 0}

    with_client(ckpt, fn)


def test_greedy_under_a_schema_is_the_same_with_the_loop_back_on_and_off(ckpt):
    schema = Reading.model_json_schema()

    async def fn(c, client):
        model = c.master.model_id
        got = {}
        for loop in (True, False, True):
            c.engine.loop_back = loop
            before = c.engine.looped_steps
            outs = []
            for content in ("first", "second reading"):
                r = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=400,
                    temperature=0,
                    response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
                )
                outs.append(r.choices[0].message.content)
            # an unconstrained request in the same group loops back where it is on
            plain = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=24,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert plain.usage.completion_tokens == 24
            got.setdefault(loop, []).append((outs, c.engine.looped_steps - before))
        return got

    got = with_client(ckpt, fn)
    on, off = got[True], got[False]
    assert on[0][0] == on[1][0] == off[0][0]
    for text in on[0][0]:
        Reading.model_validate_json(text)
    assert on[0][1] > 0 and off[0][1] == 0, got  # the loop-back was really on, and really off


def _calls_from_stream(chunks):
    calls: dict[int, dict] = {}
    content, finish = [], None
    for chunk in chunks:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            if ch.delta.content:
                content.append(ch.delta.content)
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
    return [calls[i] for i in sorted(calls)], "".join(content), finish


def _tool_loop(ckpt):
    async def fn(c, client):
        model = c.master.model_id
        msgs = [{"role": "developer", "content": "use tools"}, {"role": "user", "content": "weather in Oslo?"}]
        out = {}
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            r = await client.chat.completions.create(
                model=model,
                messages=msgs,
                tools=[WEATHER, CLOCK],
                tool_choice=choice,
                parallel_tool_calls=False,
                max_tokens=300,
                temperature=0,
            )
            ch = r.choices[0]
            assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch
            call = ch.message.tool_calls[0]
            args = json.loads(call.function.arguments)
            if isinstance(choice, dict):
                assert call.function.name == "get_weather"
            if call.function.name == "get_weather":
                assert args["city"] in ("Paris", "Oslo", "Lima") and isinstance(args["days"], int)
                assert set(args) == {"city", "days"}
            out[json.dumps(choice)] = (call.function.name, args)
            # the same request streamed: the same call, as OpenAI's deltas
            stream = await client.chat.completions.create(
                model=model,
                messages=msgs,
                tools=[WEATHER, CLOCK],
                tool_choice=choice,
                parallel_tool_calls=False,
                max_tokens=300,
                temperature=0,
                stream=True,
            )
            calls, text, finish = _calls_from_stream([x async for x in stream])
            assert finish == "tool_calls" and text.strip() == "" and len(calls) == 1, (calls, text)
            assert calls[0]["id"] and calls[0]["name"] == call.function.name
            assert json.loads(calls[0]["arguments"]) == args
            # step two: the tool's result goes back, the model answers
            follow = [
                *msgs,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
            ]
            for stream_it in (False, True):
                r2 = await client.chat.completions.create(
                    model=model, messages=follow, tools=[WEATHER, CLOCK], max_tokens=12, temperature=0, stream=stream_it
                )
                if stream_it:
                    _, text, finish = _calls_from_stream([x async for x in r2])
                else:
                    text, finish = r2.choices[0].message.content or "", r2.choices[0].finish_reason
                assert finish in ("stop", "length", "tool_calls")
        # parallel calls allowed: one or more, each valid
        r = await client.chat.completions.create(
            model=model, messages=msgs, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=600, temperature=0
        )
        assert r.choices[0].message.tool_calls and r.choices[0].finish_reason == "tool_calls"
        assert c.engine.held() == {"running": 0, "waiting": 0, "text_streams": 0}
        return out

    return fn


def test_two_step_tool_loop_streamed_and_not_on_a_tool_template(ckpt):
    with_client(ckpt, _tool_loop(ckpt))


def test_two_step_tool_loop_on_a_template_without_tools_uses_the_generic_format(generic_ckpt):
    tok = AutoTokenizer.from_pretrained(generic_ckpt)
    assert tool_format(tok.chat_template).value == "generic"
    with_client(generic_ckpt, _tool_loop(generic_ckpt))


@pytest.mark.parametrize("arch", TOOL_FAMILIES)
def test_the_prompt_with_tools_is_what_transformers_renders(arch, tmp_path):
    path = make_tiny_checkpoint(arch, tmp_path / arch, num_layers=1)
    tok = AutoTokenizer.from_pretrained(path)
    assert tool_format(tok.chat_template).value == "tagged"
    raw = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
    ]
    from pydantic import TypeAdapter

    from master_core.messages import Message

    parsed = TypeAdapter(list[Message]).validate_python(raw, strict=True)
    tools = [ToolDef.model_validate(WEATHER), ToolDef.model_validate(CLOCK)]
    got = render_prompt(tok, template_messages(parsed), tools, tool_format(tok.chat_template))
    want_msgs = [
        raw[0],
        raw[1],
        {"role": "assistant", "content": "", "tool_calls": [{**raw[2]["tool_calls"][0]}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C", "name": "get_weather"},
    ]
    want_msgs[2]["tool_calls"][0] = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    want = tok.apply_chat_template(want_msgs, tools=[WEATHER, CLOCK], add_generation_prompt=True, tokenize=False)
    assert got == want
    assert "<tool_call>" in got and '"get_time"' in got
    assert isinstance(parsed[1], UserMessage)


def test_message_forms_clients_send_and_bad_input(ckpt):
    async def fn(c, client):
        model = c.master.model_id
        import aiohttp

        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as http:

            async def post(body, path="/v1/chat/completions"):
                async with http.post(c.base_url + path, json={"model": model, **body}, headers=auth) as r:
                    return r.status, await r.json()

            hello = {"role": "user", "content": "hello"}
            # accepted: text parts, developer and system, names, null assistant content with calls,
            # and the fields clients commonly add
            call = {"id": "c9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
            ok = [
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}
                    ]
                },
                {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u", "name": "ann"}]},
                {
                    "messages": [
                        hello,
                        {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
                        {"role": "tool", "tool_call_id": "c9", "content": [{"type": "text", "text": "sunny"}]},
                    ],
                    "tools": [WEATHER],
                },
                {"messages": [hello], "metadata": {"a": "b"}, "store": False, "service_tier": "auto"},
                {"messages": [hello], "response_format": {"type": "text"}, "logit_bias": {}, "modalities": ["text"]},
                {"messages": [hello], "tools": [WEATHER], "tool_choice": "none"},
            ]
            for body in ok:
                status, answer = await post({**body, "max_tokens": 3})
                assert status == 200, (body, answer)
            # the two contents of the text parts render the same prompt as the string
            s1, a1 = await post({"messages": ok[0]["messages"], "max_tokens": 3, "temperature": 0})
            s2, a2 = await post({"messages": [hello], "max_tokens": 3, "temperature": 0})
            assert a1["usage"] == a2["usage"] and a1["choices"][0]["message"] == a2["choices"][0]["message"]
            deep: dict = {"type": "object"}
            for _ in range(40):
                deep = {"type": "object", "properties": {"a": deep}}
            huge = {
                "type": "object",
                "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)},
            }
            rf = lambda s: {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}  # noqa: E731
            bad = [
                (
                    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                    "image_url",
                ),
                ({"messages": [hello, {"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "tool_call_id"),
                ({"messages": [hello, {"role": "tool", "content": "x"}]}, "tool_call_id"),
                (
                    {
                        "messages": [
                            {
                                "role": "assistant",
                                "content": None,
                                "tool_calls": [{**call, "function": {"name": "f", "arguments": "{oops"}}],
                            }
                        ]
                    },
                    "arguments",
                ),
                ({"messages": [hello], "response_format": rf({"type": "objectx"})}, "objectx"),
                ({"messages": [hello], "response_format": rf({"$ref": "#/nowhere"})}, "nowhere"),
                ({"messages": [hello], "response_format": rf({"type": "string", "pattern": "(a"})}, "response_format"),
                ({"messages": [hello], "response_format": rf(deep)}, "levels deep"),
                ({"messages": [hello], "response_format": rf(huge)}, "bytes"),
                ({"messages": [hello], "response_format": {"type": "json_schema"}}, "schema"),
                (
                    {
                        "messages": [hello],
                        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                    },
                    "parameters",
                ),
                (
                    {
                        "messages": [hello],
                        "tools": [
                            {
                                "type": "function",
                                "function": {
                                    "name": "f",
                                    "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}},
                                },
                            }
                        ],
                    },
                    "parameters",
                ),
                ({"messages": [hello], "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
                ({"messages": [hello], "tools": [WEATHER, WEATHER]}, "twice"),
                (
                    {
                        "messages": [hello],
                        "tools": [WEATHER],
                        "tool_choice": {"type": "function", "function": {"name": "other"}},
                    },
                    "other",
                ),
                ({"messages": [hello], "tool_choice": "required"}, "no tools"),
                ({"messages": [hello], "logit_bias": {"5": 10}}, "logit_bias"),
                ({"messages": [hello], "functions": [{"name": "f"}]}, "functions"),
                ({"messages": [hello], "modalities": ["audio"]}, "modalities"),
                ({"prompt": "x", "regex": "[a-"}, "regex"),
                ({"prompt": "x", "grammar": "start: nothing_defined"}, "grammar"),
                ({"prompt": "x", "regex": "a", "grammar": 'start: "a"'}, "not several"),
            ]
            for body, why in bad:
                path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                status, answer = await post({**body, "max_tokens": 3}, path)
                assert status == 400, (body, answer)
                assert why in answer["error"]["message"] or why in (answer["error"]["param"] or ""), (why, answer)
            # nothing lost: the group still serves, nothing is held
            status, answer = await post({"messages": [hello], "max_tokens": 3})
            assert status == 200
        assert c.engine.held() == {"running": 0, "waiting": 0, "text_streams": 0}

    with_client(ckpt, fn)


def test_a_schema_that_takes_long_to_compile_is_refused_without_slowing_others(ckpt):
    # llguidance compiles lazily and bounds its own work (no schema under the size limit found
    # here takes more than ~30 ms), so the compile is slowed on purpose to test the time bound
    import asyncio
    import time

    from master_core import grammar

    async def fn(c, client):
        model = c.master.model_id
        grammars = c.master.api.grammars
        real = grammars.compile_now

        def slow(spec):
            if "slow" in spec.source:
                time.sleep(1.5)
            return real(spec)

        grammars.compile_now = slow
        old = grammar.COMPILE_SECONDS
        grammar.COMPILE_SECONDS = 0.5
        try:
            loop = asyncio.get_running_loop()
            schema = {"type": "object", "properties": {"slow": {"type": "integer"}}}
            heavy = asyncio.create_task(
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "x"}],
                    max_tokens=3,
                    response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
                )
            )
            await asyncio.sleep(0.05)
            t = loop.time()
            plain = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], max_tokens=3
            )
            assert plain.choices[0].message.content is not None and loop.time() - t < 1.0
            with pytest.raises(openai.BadRequestError) as e:
                await heavy
            assert "did not compile within" in str(e.value), e.value
        finally:
            grammar.COMPILE_SECONDS = old
            grammars.compile_now = real

    with_client(ckpt, fn)
