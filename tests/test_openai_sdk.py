"""The official openai SDK against a real group, checked against single-process transformers."""

import openai
import pytest
import torch
from harness import Cluster, run
from tiny_models import _load, make_tiny_checkpoint, reference_greedy

KEY = "sk-test-molink"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("sdk") / "qwen2", num_layers=4, seed=5)


def with_client(ckpt, fn, **master):
    async def main():
        async with Cluster(ckpt, workers=3, api_key=KEY, **master) as c:
            client = openai.AsyncOpenAI(base_url=c.base_url + "/v1", api_key=KEY, max_retries=0)
            try:
                return await fn(c, client)
            finally:
                await client.close()

    return run(main())


def chat_prompt_ids(tok, content):
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sdk_completions_chat_streaming_usage(ckpt):
    async def fn(c, client):
        tok = c.engine.tokenizer
        model = c.master.model_id
        # completions, prompt as token ids
        prompt = [11, 12, 13, 14, 15]
        ref = reference_greedy(ckpt, prompt, 16)
        r = await client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 16, 21)
        # chat, non-streaming
        ids = chat_prompt_ids(tok, "tell me about the pipeline")
        ref = reference_greedy(ckpt, ids, 20)
        r = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "tell me about the pipeline"}],
            max_completion_tokens=20,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        want = tok.decode(ref, skip_special_tokens=True)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 20
        # chat, streaming, with the final usage chunk
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "tell me about the pipeline"}],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        pieces, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                pieces.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        assert "".join(pieces) == want and finish == "length"
        assert usage.completion_tokens == 20 and usage.prompt_tokens == len(ids)
        # completions streaming
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        text = "".join([ch.text async for chunk in stream for ch in chunk.choices])
        assert text == tok.decode(reference_greedy(ckpt, prompt, 16), skip_special_tokens=True)

    with_client(ckpt, fn)


def test_sdk_stop_strings_cut_the_output(ckpt):
    async def fn(c, client):
        tok = c.engine.tokenizer
        prompt = [30, 31, 32, 33]
        full = tok.decode(reference_greedy(ckpt, prompt, 24), skip_special_tokens=True)
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        assert stop and full.find(stop) >= 0
        want = full[: full.find(stop)]
        for stream in (False, True):
            kw = dict(
                model=c.master.model_id,
                prompt=prompt,
                max_tokens=24,
                temperature=0,
                stop=[stop, "\u2603never"],
                extra_body={"ignore_eos": True},
            )
            if stream:
                s = await client.completions.create(stream=True, **kw)
                got, finish = "", None
                async for chunk in s:
                    for ch in chunk.choices:
                        got += ch.text
                        finish = ch.finish_reason or finish
            else:
                r = await client.completions.create(**kw)
                got, finish = r.choices[0].text, r.choices[0].finish_reason
            assert got == want and finish == "stop", (stream, got, want)

    with_client(ckpt, fn)


def test_sdk_seed_reproducible_and_n_choices(ckpt):
    async def fn(c, client):
        kw = dict(
            model=c.master.model_id,
            prompt=[40, 41, 42],
            max_tokens=16,
            temperature=1.0,
            top_p=0.9,
            extra_body={"ignore_eos": True},
        )
        a = await client.completions.create(seed=1234, **kw)
        b = await client.completions.create(seed=1234, **kw)
        others = [await client.completions.create(seed=s, **kw) for s in (1, 2, 3)]
        assert a.choices[0].text == b.choices[0].text
        assert any(o.choices[0].text != a.choices[0].text for o in others)
        n = await client.completions.create(seed=7, n=3, **kw)
        assert sorted(ch.index for ch in n.choices) == [0, 1, 2]
        assert n.usage.completion_tokens == 48 and n.usage.prompt_tokens == 3
        again = await client.completions.create(seed=7, n=3, **kw)
        assert [ch.text for ch in sorted(n.choices, key=lambda x: x.index)] == [
            ch.text for ch in sorted(again.choices, key=lambda x: x.index)
        ]

    with_client(ckpt, fn)


def test_sdk_logprobs_match_transformers(ckpt):
    prompt = [50, 51, 52, 53, 54, 55]
    ref = reference_greedy(ckpt, prompt, 8)
    with torch.inference_mode():
        logits = _load(str(ckpt))(torch.tensor([prompt + ref])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]  # predicts each generated token
    want = [float(logp[i, t]) for i, t in enumerate(ref)]
    want_top = [torch.topk(logp[i], 3).indices.tolist() for i in range(len(ref))]

    async def fn(c, client):
        tok = c.engine.tokenizer
        r = await client.chat.completions.create(
            model=c.master.model_id,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=3,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
        )
        assert len(r.choices[0].logprobs.content) >= 1 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
        r = await client.completions.create(
            model=c.master.model_id,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            logprobs=3,
            extra_body={"ignore_eos": True},
        )
        lp = r.choices[0].logprobs
        assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
        assert lp.tokens == tok.convert_ids_to_tokens(ref)
        assert [list(d.keys()) for d in lp.top_logprobs] == [tok.convert_ids_to_tokens(t) for t in want_top]

    with_client(ckpt, fn)


def test_sdk_errors_have_openai_shape(ckpt):
    async def fn(c, client):
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=c.master.model_id, prompt="x", max_tokens=0)
        bad = openai.AsyncOpenAI(base_url=c.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        await bad.close()
        models = await client.models.list()
        assert [m.id for m in models.data] == [c.master.model_id]

    with_client(ckpt, fn)
