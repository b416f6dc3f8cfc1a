"""Hostile and malformed HTTP input: every request gets its 4xx, never a 5xx, and the server
keeps serving well-formed requests afterwards."""

import asyncio
import json

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from harness import Cluster, run
from tiny_models import make_tiny_checkpoint

KEY = "sk-bad-input"
M = "MODEL"  # replaced by the served model id

WRONG_VALUES = {
    "max_tokens": ["10", 1.5, -1, 0, 10**30, True, [], {}],
    "max_completion_tokens": ["x", -5, 0, 10**12, [1]],
    "temperature": ["hot", -0.1, 2.5, 1e308, [], {}, "NaN"],
    "top_p": [0, -1, 1.01, "all", []],
    "seed": ["42", 2**64, 1.5, []],
    "stop": [5, [1, 2], ["x" * 1000], ["a"] * 20, {"s": 1}, [None]],
    "stream": ["true", 2, [], {}],
    "stream_options": ["yes", {"include_usage": "yes"}, {"other": True}, [1]],
    "presence_penalty": [-3, 3, "x", []],
    "frequency_penalty": [-2.5, 9, "x", {}],
    "n": [0, -1, 100, "2", 1.5],
    "user": [5, ["u"], "u" * 1000],
    "model": [5, "", None, [], "x" * 1000, "unknown-model"],
}
COMPLETION_ONLY = {
    "prompt": [None, 5, "", [], [-1], [10**9], ["a", "b"], {"t": 1}, [1.5]],
    "logprobs": [-1, 21, "3", True],
    "echo": [True, "x"],
}
CHAT_ONLY = {
    "messages": [
        None,
        "hi",
        [],
        [{}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": "x", "extra": 1}],
        [{"role": "user", "content": "x"}] * 2000,
    ],
    "logprobs": ["yes", 3],
    "top_logprobs": [-1, 21, "2"],
}


def bodies():
    out = []
    base_c = {"model": M, "prompt": "hello", "max_tokens": 4}
    base_ch = {"model": M, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    for field, values in WRONG_VALUES.items():
        for v in values:
            out.append(("/v1/completions", json.dumps({**base_c, field: v}).encode()))
            out.append(("/v1/chat/completions", json.dumps({**base_ch, field: v}).encode()))
    for field, values in COMPLETION_ONLY.items():
        out += [("/v1/completions", json.dumps({**base_c, field: v}).encode()) for v in values]
    for field, values in CHAT_ONLY.items():
        out += [("/v1/chat/completions", json.dumps({**base_ch, field: v}).encode()) for v in values]
    raw = [
        b"",
        b"{",
        b"null",
        b"[]",
        b"42",
        b'"s"',
        b"\xff\xfe\x00",
        b'{"model": "\xff"}',
        b"{" * 5000 + b"}" * 5000,
        json.dumps({**base_c, "unknown": 1}).encode(),
        json.dumps({**base_c, "functions": []}).encode(),
        json.dumps({k: v for k, v in base_c.items() if k != "prompt"}).encode(),
        b'{"model": 1e999}',
    ]
    for path in ("/v1/completions", "/v1/chat/completions"):
        out += [(path, r) for r in raw]
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("bad") / "llama", num_layers=2, seed=2)


def test_more_than_200_hostile_requests_get_4xx_and_serving_goes_on(ckpt):
    cases = bodies()

    async def main():
        async with (
            Cluster(ckpt, workers=2, api_key=KEY, body_timeout=1.0, max_body_bytes=1024 * 1024) as c,
            aiohttp.ClientSession() as http,
        ):
            auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            model = c.master.model_id
            statuses = {}

            async def check(method, path, expect_range=(400, 499), **kw):
                # encoded: the path goes out byte for byte (no client-side normalising of "..")
                url = yarl.URL(c.base_url + path, encoded=True)
                async with http.request(method, url, **kw) as r:
                    body = await r.read()
                    assert expect_range[0] <= r.status <= expect_range[1], (
                        method,
                        path,
                        r.status,
                        body[:200],
                        kw.get("data", b"")[:120],
                    )
                    if path.startswith("/v1") and r.status != 405:
                        err = json.loads(body)["error"]
                        assert isinstance(err["message"], str) and err["type"]
                    statuses[r.status] = statuses.get(r.status, 0) + 1

            for path, data in cases:
                await check("POST", path, data=data.replace(M.encode(), model.encode()), headers=auth)
            ok = json.dumps({"model": model, "prompt": "hello", "max_tokens": 2}).encode()
            # authentication
            await check("POST", "/v1/completions", data=ok)
            await check("POST", "/v1/completions", data=ok, headers={"Authorization": "Bearer nope"})
            await check("POST", "/v1/completions", data=ok, headers={"Authorization": KEY})
            await check("GET", "/v1/models", headers={"Authorization": "Basic " + KEY})
            # DNS rebinding and cross-site requests
            for host in ("evil.example", "evil.example:80", f"127.0.0.1:{c.master.port + 1}", "", "127.0.0.1", "[::1"):
                await check("POST", "/v1/completions", data=ok, headers={**auth, "Host": host})
            for origin in (
                "http://evil.example",
                "null",
                f"http://localhost:{c.master.port + 1}",
                "https://attacker.test",
            ):
                await check("POST", "/v1/completions", data=ok, headers={**auth, "Origin": origin})
                await check(
                    "GET",
                    "/dashboard/api/state",
                    headers={"Origin": origin, "X-MoLink-Token": c.master.dashboard_token},
                )
            await check("GET", "/dashboard")
            await check("GET", "/dashboard?token=wrong")
            await check("GET", "/dashboard/api/state", headers={"X-MoLink-Token": "wrong"})
            await check("GET", "/dashboard/static/../../etc/passwd")
            # percent-encoded names reach the static handler decoded (the first is app.js) ...
            await check("GET", "/dashboard/static/%61pp.js", expect_range=(200, 200))
            # ... so these reach it as "../../etc/passwd", "..", "../index.html": all refused
            for name in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2E%2E%2Findex.html", "..%5C..%5Cwin.ini"):
                await check("GET", f"/dashboard/static/{name}")
            for name in ("../../etc/passwd", "..", "/etc/passwd", "app.js/../../x"):  # and called directly
                with pytest.raises(web.HTTPNotFound):
                    await c.master.dashboard.static(make_mocked_request("GET", "/", match_info={"name": name}))
            await check("GET", "/dashboard/static/secret.py")
            # sizes and methods
            await check("POST", "/v1/completions", data=b"x" * (10 * 1024 * 1024), headers=auth)
            await check(
                "POST",
                "/v1/completions",
                data=json.dumps({"model": model, "prompt": "word " * 200000}).encode(),
                headers=auth,
            )
            await check(
                "POST",
                "/v1/completions",
                data=json.dumps({"model": model, "prompt": "a", "max_tokens": 100000}).encode(),
                headers=auth,
            )
            await check("GET", "/v1/completions", headers=auth)
            await check("DELETE", "/v1/models", headers=auth)
            await check("GET", "/v1/nothing-here", headers=auth)

            # slow-loris body: headers promise 1000 bytes, the body trickles and stops
            async def trickle():
                yield b'{"model": '
                await asyncio.sleep(3)
                yield b'"x"}'

            await check("POST", "/v1/completions", data=trickle(), headers={**auth, "Content-Length": "1000"})
            # a raw connection that sends half a request and goes quiet does not stop others
            reader, writer = await asyncio.open_connection("127.0.0.1", c.master.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n{")
            await writer.drain()

            assert not any(s >= 500 for s in statuses)
            async with http.post(c.base_url + "/v1/completions", data=ok, headers=auth) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] >= 1
            writer.close()

    run(main())
