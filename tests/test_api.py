"""The HTTP API over a real group of a tiny model: answers, streaming, and 4xx for bad bodies."""

import asyncio
import json

import aiohttp
import pytest
from harness import Cluster, run
from tiny_models import make_tiny_checkpoint, reference_greedy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("api") / "llama", num_layers=4, seed=3)


BAD_BODIES = [
    b"",
    b"not json",
    b"\xff\xfe\xfd",
    b"[1, 2]",
    b'"just a string"',
    json.dumps({"prompt": "hi"}).encode(),  # no model
    json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": -1}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": "ten"}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": 10**12}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "temperature": 99}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "top_p": 0}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "unknown_field": 1}).encode(),
    json.dumps({"model": "MODEL", "prompt": ""}).encode(),
    json.dumps({"model": "MODEL", "prompt": [10**9]}).encode(),
    json.dumps({"model": "MODEL", "prompt": [-1]}).encode(),
    json.dumps({"model": "MODEL", "prompt": {"a": 1}}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "stop": ["a"] * 50}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "n": 9}).encode(),
    json.dumps({"model": "MODEL", "prompt": "hi", "stream": "yes please"}).encode(),
]


def test_models_health_and_bad_bodies(ckpt):
    async def main():
        async with Cluster(ckpt, workers=2) as c, aiohttp.ClientSession() as http:
            model = c.master.model_id
            async with http.get(f"{c.base_url}/v1/models") as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == model
            async with http.get(f"{c.base_url}/health") as r:
                h = await r.json()
                assert r.status == 200 and h["status"] == "ok" and len(h["workers"]) == 2
            for body in BAD_BODIES:
                body = body.replace(b"MODEL", model.encode())
                for path in ("/v1/completions", "/v1/chat/completions"):
                    async with http.post(
                        c.base_url + path, data=body, headers={"Content-Type": "application/json"}
                    ) as r:
                        assert 400 <= r.status < 500, (path, body[:80], r.status)
                        err = (await r.json())["error"]
                        assert err["message"] and err["type"]
            async with http.post(f"{c.base_url}/v1/completions", json={"model": "nope", "prompt": "x"}) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
            async with http.post(f"{c.base_url}/v1/completions", data=b"x" * (5 * 1024 * 1024)) as r:
                assert r.status == 413
            async with http.post(f"{c.base_url}/v1/chat/completions", json={"model": model, "messages": []}) as r:
                assert r.status == 400
            # still serving a well-formed request
            async with http.post(
                f"{c.base_url}/v1/completions",
                json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0},
            ) as r:
                assert r.status == 200
                assert (await r.json())["usage"]["prompt_tokens"] == 3

    run(main())


def test_completions_match_reference_streaming_and_not(ckpt):
    from transformers import AutoTokenizer

    prompt = [9, 8, 7, 6, 5, 4]
    ref = reference_greedy(ckpt, prompt, 12)
    messages = [{"role": "user", "content": "hello there"}]
    tok = AutoTokenizer.from_pretrained(ckpt)
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ref = reference_greedy(ckpt, tok(chat_text, add_special_tokens=False)["input_ids"], 5)

    async def main():
        async with Cluster(ckpt, workers=3) as c, aiohttp.ClientSession() as http:
            tok = c.engine.tokenizer
            body = {
                "model": c.master.model_id,
                "prompt": prompt,
                "max_tokens": 12,
                "temperature": 0,
                "ignore_eos": True,
            }
            async with http.post(f"{c.base_url}/v1/completions", json=body) as r:
                assert r.status == 200
                data = await r.json()
            assert data["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)
            assert data["choices"][0]["finish_reason"] == "length"
            assert data["usage"] == {
                "prompt_tokens": 6,
                "completion_tokens": 12,
                "total_tokens": 18,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
            pieces, final = [], None
            async with http.post(f"{c.base_url}/v1/completions", json=body | {"stream": True}) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                async for line in r.content:
                    line = line.decode().strip()
                    if line.startswith("data: ") and line != "data: [DONE]":
                        ch = json.loads(line[6:])["choices"][0]
                        pieces.append(ch["text"])
                        final = ch["finish_reason"] or final
            assert "".join(pieces) == data["choices"][0]["text"] and final == "length"
            chat = {
                "model": c.master.model_id,
                "messages": messages,
                "max_tokens": 5,
                "temperature": 0,
                "ignore_eos": True,
            }
            async with http.post(f"{c.base_url}/v1/chat/completions", json=chat) as r:
                assert r.status == 200
                answer = await r.json()
            msg = answer["choices"][0]["message"]
            # the chat template applied by the master, then the same greedy tokens as transformers
            assert msg["role"] == "assistant" and msg["content"] == tok.decode(chat_ref, skip_special_tokens=True)
            assert answer["usage"]["completion_tokens"] == 5

    run(main())


def test_queue_full_is_429_and_no_workers_is_503(ckpt):
    async def main():
        async with Cluster(ckpt, workers=1, max_running=1, max_queued=1) as c, aiohttp.ClientSession() as http:
            body = {
                "model": c.master.model_id,
                "prompt": [5, 6, 7],
                "max_tokens": 40,
                "temperature": 0,
                "ignore_eos": True,
            }
            rs = await asyncio.gather(*(http.post(f"{c.base_url}/v1/completions", json=body) for _ in range(5)))
            statuses = sorted(r.status for r in rs)
            errors = [await r.json() for r in rs if r.status == 429]
            for r in rs:
                r.release()
            assert statuses.count(200) >= 1 and statuses.count(429) >= 3
            assert errors[0]["error"]["type"] == "rate_limit_error"
            c.tasks[0].cancel()  # the only worker leaves
            await asyncio.gather(*c.tasks, return_exceptions=True)
            for _ in range(100):
                if not c.master.group.live_links():
                    break
                await asyncio.sleep(0.05)
            async with http.post(f"{c.base_url}/v1/completions", json=body) as r:
                assert r.status == 503 and (await r.json())["error"]["type"] == "service_unavailable"

    run(main())
