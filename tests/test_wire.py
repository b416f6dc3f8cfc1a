"""Wire protocol: every message round-trips; every defect is a ProtocolError, never a crash."""

import json
import struct

import pytest
import torch

from worker_core import wire
from worker_core.wire import (
    Assign,
    Chunk,
    Failure,
    Fetch,
    Free,
    Hello,
    Leave,
    Part,
    ProtocolError,
    Ready,
    Recall,
    Result,
    Route,
    Routed,
    Segment,
    Step,
    TensorSpec,
    decode,
    encode,
)

SHA = "ab" * 32

MESSAGES = [
    Hello("w1", "cpu", "x86_64", 10**10, 5 * 10**9, "float32", 75.5),
    Hello(
        "w2",
        "cuda:0",
        "NVIDIA GeForce RTX 3080",
        10**10,
        9 * 10**9,
        "bfloat16",
        2e4,
        "8.6",
        "550.54.14",
        32 * 10**9,
        16,
        21.5,
        93.2,
    ),
    Assign(3, "/models/x", 0, 10, 30, 512, 4096),
    Assign(
        3, "d" * 64, 0, 10, 30, 512, 4096, '{"a": 1}', (TensorSpec("model.norm.weight", "BF16", (576,), 1152, SHA),)
    ),
    Assign(
        3,
        "d" * 64,
        0,
        10,
        30,
        512,
        4096,
        "{}",
        (TensorSpec("w", "F16", (4,), 8, SHA, "model-00001-of-00002.safetensors", 4096),),
        "owner/name@" + "0" * 40,
    ),
    Fetch(SHA, 1 << 20, 1 << 20),
    Chunk(SHA, 0, "cd" * 32, b"\x00\x01weights"),
    Ready(3, 576, 49152, 1.5, 123456),
    Ready(3, 576, 49152, 1.5, 123456, draft_seconds=0.004),  # it holds the draft model its Assign named
    Assign(  # the last range, with the draft model the loop-back drafts with
        3,
        "d" * 64,
        20,
        30,
        30,
        512,
        4096,
        draft_model="e" * 64,
        draft_config_json='{"b": 2}',
        draft_manifest=(TensorSpec("model.embed_tokens.weight", "F32", (8, 4), 128, SHA),),
    ),
    Assign(3, "/models/x", 20, 30, 30, 512, 4096, draft_model="/models/small"),
    Assign(3, "/models/x", 0, 30, 30, 512, 4096, tapes=(10, 20)),  # a standby keeping two stage ends
    Free((1, 2, 3)),
    Failure("boom", 7),
    Failure("step 8 cannot loop back: the loop-back hop is down", 8, unsent=True),
    Leave(False),
    Leave(True),
    Route(4, "ab" * 16, "-----BEGIN CERTIFICATE-----", "192.168.1.20:7001", "", "cd" * 16),
    Route(4, next_address="[fe80::1]:7001", next_token="ef" * 16),
    Route(4),
    Routed(4, True, 3.5),
    Recall(9, 4, (Segment(11, 0, 48, False, 2), Segment(12, 16, 5, False))),
    Routed(4, False, reason="10.0.0.3:7001: no answer within 3 s"),
    Routed(4, False, reason="no next hop", mapped="25.0.0.11:7734"),
    # through a relay: the next stage registered its hop listener there, and the hop crosses it
    Route(4, next_address="25.0.0.12:7734", next_cert="-----BEGIN", next_token="ef" * 16, next_relay="25.0.0.100:7735"),
    Route(4, next_cert="-----BEGIN", next_token="ef" * 16, next_relay="[2a0f:ff00::100]:7735"),
    Routed(4, True, 41.0, through="25.0.0.100:7735"),
    Part(b"MLK\x0c" + bytes(100), False),  # a piece of a longer frame (worker_core.pieces)
    Assign(  # a GGUF model's tensors travel as their blocks: U8 bytes, GGML type, logical shape
        3,
        "d" * 64,
        0,
        10,
        30,
        512,
        4096,
        "{}",
        (
            TensorSpec("model.layers.0.mlp.up_proj.weight", "U8", (1536, 576), 1536 * 18 * 18, SHA, gguf_type="Q4_0"),
            TensorSpec("model.norm.weight", "U8", (576,), 576 * 4, SHA, gguf_type="F32"),
            TensorSpec("model.layers.0.mlp.down_proj.weight", "U8", (576, 1536), 576 * 6 * 210, SHA, gguf_type="Q6_K"),
        ),
    ),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_plain_messages_round_trip(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_messages_round_trip(dtype):
    segs = (Segment(1, 0, 3, False), Segment(9, 40, 1, True))
    x = torch.randn(4, 8).to(dtype)
    got = decode(encode(Step(5, 2, segs, x)))
    assert isinstance(got, Step) and got.segments == segs and got.step_id == 5 and got.epoch == 2
    assert got.tensor.dtype == dtype and torch.equal(got.tensor, x)
    ids = torch.tensor([1, 2, 3, 4])
    r = decode(encode(Result(5, 2, 0.25, 0.5, ids)))
    assert isinstance(r, Result) and torch.equal(r.tensor, ids) and r.compute_seconds == 0.25
    onward = decode(encode(Step(5, 2, segs, x, 8, forward=True, trail=(0.01, 0.02), held=(0.03, 0.5))))
    assert isinstance(onward, Step) and onward.forward and onward.trail == (0.01, 0.02) and onward.topk == 8
    assert onward.held == (0.03, 0.5)
    back = decode(encode(Result(5, 2, 0.25, 0.5, ids, (0.01, 0.02), held=(0.03, 0.5))))
    assert isinstance(back, Result) and back.trail == (0.01, 0.02) and back.held == (0.03, 0.5)
    draws = (wire.Draw(0.0, 1.0, 0), wire.Draw(0.7, 0.9, (1 << 64) - 1))
    looped = decode(encode(Step(5, 2, segs, x, 8, forward=True, loop=7, draws=draws)))
    assert isinstance(looped, Step) and looped.loop == 7 and looped.draws == draws
    plain = decode(encode(Step(5, 2, segs, x)))
    assert isinstance(plain, Step) and plain.loop == 0 and plain.draws == ()
    drawn = decode(encode(Result(5, 2, 0.25, 0.5, ids, tokens=(3, 0))))
    assert isinstance(drawn, Result) and drawn.tokens == (3, 0)
    drafting = (wire.Draw(0.0, 1.0, 0, 4, 30, (1, 2, 3), (7,), model_k=2), wire.Draw(0.0, 1.0, 0, 4, 9, (), (5,)))
    twice = (Segment(1, 0, 2, True, rows=2), Segment(9, 40, 2, True, rows=2))
    looped = decode(encode(Step(5, 2, twice, ids, 8, forward=True, loop=3, draws=drafting)))
    assert isinstance(looped, Step) and looped.draws == drafting
    made = Result(5, 2, 0.25, 0.5, ids, tokens=(3, 0), drafts=((4,), ()), by_model=(True, False), draft_seconds=0.01)
    by_model = decode(encode(made))
    assert isinstance(by_model, Result) and by_model.by_model == (True, False) and by_model.draft_seconds == 0.01
    for given in (x, ids, torch.empty(0, 8)):  # hidden rows, token ids, or none (the stage's own rows)
        fill = decode(encode(wire.Fill(6, 2, segs, 4, 6, given)))
        assert isinstance(fill, wire.Fill) and (fill.step_id, fill.epoch, fill.segments) == (6, 2, segs)
        assert (fill.layer_start, fill.layer_end) == (4, 6) and torch.equal(fill.tensor, given)


def test_the_last_stage_draws_the_token_the_master_would():
    from master_core.request import SamplingParams
    from master_core.sampling import sample
    from worker_core.sampling import candidates, draw, token_generator

    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: whichever the row lists first, on both sides
    k = 8
    values, ids = torch.topk(logits, k, dim=-1)
    packed = torch.cat([torch.logsumexp(logits, -1, keepdim=True), values, ids.float()], dim=-1)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.8)):
        for rows, topk in ((packed, k), (logits, 0)):
            for position, row in enumerate(rows):
                v, i, lse = candidates(row, topk)
                stage = draw(v, i, params.temperature, params.top_p, token_generator(1234, position))
                master = sample(v, i, lse, params, token_generator(1234, position), []).token_id
                assert stage == master
                if params.temperature == 0:
                    assert float(logits[position, stage]) == float(logits[position].max())
    # the same seed and position draw the same token; other positions draw from fresh streams
    g = [torch.rand(4, generator=token_generator(7, p)).tolist() for p in (5, 5, 6)]
    assert g[0] == g[1] != g[2]


def _frame(kind, header, payload=b"", version=wire.PROTOCOL_VERSION, magic=b"MLK"):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">3sBBI", magic, version, kind, len(h)) + h + payload


def _step_header(**over):
    h = {
        "step_id": 1,
        "epoch": 0,
        "segments": [{"request_id": 1, "start": 0, "length": 2, "want_logits": True}],
        "tensor": {"dtype": "int64", "shape": [2]},
        "topk": 0,
    }
    h.update(over)
    return h


GOOD_PAYLOAD = torch.tensor([1, 2]).numpy().tobytes()
FILL_HEADER = {k: v for k, v in _step_header().items() if k != "topk"} | {"layers": [0, 2]}
HELLO = json.loads(encode(MESSAGES[1])[9:])  # valid headers, to spoil one field at a time
ASSIGN = json.loads(encode(MESSAGES[4])[9:])
GGUF_SPEC = {"name": "model.layers.0.self_attn.q_proj.weight", "dtype": "U8", "shape": [64, 64], "nbytes": 64 * 2 * 34}
GGUF_SPEC["gguf_type"] = "Q8_0"

BAD_FRAMES = {
    "empty": b"",
    "short": b"MLK",
    "bad magic": _frame(wire.Kind.FREE, {"request_ids": []}, magic=b"XYZ"),
    "future version": _frame(wire.Kind.FREE, {"request_ids": []}, version=99),
    "unknown kind": _frame(200, {}),
    "header length beyond frame": struct.pack(">3sBBI", b"MLK", wire.PROTOCOL_VERSION, 6, 1000) + b"{}",
    "header not json": _frame(wire.Kind.FREE, b"{not json"),
    "header not utf8": _frame(wire.Kind.FREE, b"\xff\xfe"),
    "header is a list": _frame(wire.Kind.FREE, []),
    "free ids not ints": _frame(wire.Kind.FREE, {"request_ids": ["a"]}),
    "free negative id": _frame(wire.Kind.FREE, {"request_ids": [-1]}),
    "free with payload": _frame(wire.Kind.FREE, {"request_ids": []}, b"xx"),
    "hello missing field": _frame(wire.Kind.HELLO, {"name": "x"}),
    "hello without link fields": _frame(
        wire.Kind.HELLO,
        {
            "name": "x",
            "device": "cpu",
            "device_name": "c",
            "total_memory": 1,
            "free_memory": 1,
            "dtype": "float32",
            "gflops": 1.0,
        },
    ),
    "hello negative rtt": _frame(wire.Kind.HELLO, dict(HELLO, rtt_ms=-1.0)),
    "hello infinite bandwidth": _frame(
        wire.Kind.HELLO,
        b'{"name":"x","device":"cpu","device_name":"c","total_memory":1,"free_memory":1,"dtype":"float32","gflops":1,'
        b'"compute_capability":"","driver":"","ram_total":1,"cpu_cores":1,"rtt_ms":1,"link_mbps":Infinity}',
    ),
    "hello long driver": _frame(wire.Kind.HELLO, dict(HELLO, driver="9" * 1000)),
    "hello bool as int": _frame(wire.Kind.HELLO, dict(HELLO, total_memory=True)),
    "hello bad dtype": _frame(wire.Kind.HELLO, dict(HELLO, dtype="object")),
    "hello huge name": _frame(wire.Kind.HELLO, dict(HELLO, name="x" * 10000)),
    "assign inverted range": _frame(
        wire.Kind.ASSIGN,
        {
            "epoch": 1,
            "model": "m",
            "layer_start": 5,
            "layer_end": 2,
            "num_layers": 8,
            "max_batch_tokens": 4,
            "kv_tokens": 4,
        },
    ),
    "ready nan": _frame(
        wire.Kind.READY, b'{"epoch":1,"hidden_size":4,"vocab_size":4,"load_seconds":NaN,"weight_bytes":1}'
    ),
    "step payload too short": _frame(wire.Kind.STEP, _step_header(), GOOD_PAYLOAD[:-1]),
    "step payload too long": _frame(wire.Kind.STEP, _step_header(), GOOD_PAYLOAD + b"\0"),
    "step no tensor": _frame(wire.Kind.STEP, _step_header(tensor=None), GOOD_PAYLOAD),
    "step bad dtype": _frame(wire.Kind.STEP, _step_header(tensor={"dtype": "complex64", "shape": [2]}), GOOD_PAYLOAD),
    "step negative dim": _frame(wire.Kind.STEP, _step_header(tensor={"dtype": "int64", "shape": [-2]}), GOOD_PAYLOAD),
    "step too many dims": _frame(
        wire.Kind.STEP, _step_header(tensor={"dtype": "int64", "shape": [1, 1, 1, 1, 2]}), GOOD_PAYLOAD
    ),
    "step shape float": _frame(wire.Kind.STEP, _step_header(tensor={"dtype": "int64", "shape": [2.0]}), GOOD_PAYLOAD),
    "step no segments": _frame(wire.Kind.STEP, _step_header(segments=[]), GOOD_PAYLOAD),
    "step duplicate request": _frame(
        wire.Kind.STEP,
        _step_header(segments=[{"request_id": 1, "start": 0, "length": 1, "want_logits": True}] * 2),
        GOOD_PAYLOAD,
    ),
    "step zero length": _frame(
        wire.Kind.STEP,
        _step_header(segments=[{"request_id": 1, "start": 0, "length": 0, "want_logits": True}]),
        GOOD_PAYLOAD,
    ),
    "step negative start": _frame(
        wire.Kind.STEP,
        _step_header(segments=[{"request_id": 1, "start": -1, "length": 2, "want_logits": True}]),
        GOOD_PAYLOAD,
    ),
    "step want_logits int": _frame(
        wire.Kind.STEP,
        _step_header(segments=[{"request_id": 1, "start": 0, "length": 2, "want_logits": 1}]),
        GOOD_PAYLOAD,
    ),
    "step segment not object": _frame(wire.Kind.STEP, _step_header(segments=[5]), GOOD_PAYLOAD),
    "fetch bad hash": _frame(wire.Kind.FETCH, {"sha256": "xyz", "offset": 0, "length": 1}),
    "fetch upper-case hash": _frame(wire.Kind.FETCH, {"sha256": "AB" * 32, "offset": 0, "length": 1}),
    "fetch zero length": _frame(wire.Kind.FETCH, {"sha256": SHA, "offset": 0, "length": 0}),
    "fetch huge length": _frame(wire.Kind.FETCH, {"sha256": SHA, "offset": 0, "length": 1 << 30}),
    "fetch with payload": _frame(wire.Kind.FETCH, {"sha256": SHA, "offset": 0, "length": 1}, b"x"),
    "chunk too large": _frame(
        wire.Kind.CHUNK, {"sha256": SHA, "offset": 0, "chunk_sha256": SHA}, b"\0" * (wire.MAX_CHUNK_BYTES + 1)
    ),
    "chunk no hash": _frame(wire.Kind.CHUNK, {"sha256": SHA, "offset": 0}, b"x"),
    "assign manifest not list": _frame(
        wire.Kind.ASSIGN,
        {
            "epoch": 1,
            "model": "m",
            "layer_start": 0,
            "layer_end": 2,
            "num_layers": 8,
            "max_batch_tokens": 4,
            "kv_tokens": 4,
            "config_json": "",
            "manifest": {},
        },
    ),
    "assign manifest bad dtype": _frame(
        wire.Kind.ASSIGN,
        {
            "epoch": 1,
            "model": "m",
            "layer_start": 0,
            "layer_end": 2,
            "num_layers": 8,
            "max_batch_tokens": 4,
            "kv_tokens": 4,
            "config_json": "",
            "manifest": [{"name": "w", "dtype": "PICKLE", "shape": [1], "nbytes": 1, "sha256": SHA}],
        },
    ),
    "assign manifest negative size": _frame(
        wire.Kind.ASSIGN,
        {
            "epoch": 1,
            "model": "m",
            "layer_start": 0,
            "layer_end": 2,
            "num_layers": 8,
            "max_batch_tokens": 4,
            "kv_tokens": 4,
            "config_json": "",
            "manifest": [{"name": "w", "dtype": "F32", "shape": [1], "nbytes": -4, "sha256": SHA}],
        },
    ),
    "assign bad hub ref": _frame(wire.Kind.ASSIGN, dict(ASSIGN, hub="owner/name@main")),
    "assign tensor file escapes": _frame(
        wire.Kind.ASSIGN, dict(ASSIGN, manifest=[dict(ASSIGN["manifest"][0], file="../../etc/passwd")])
    ),
    "assign tensor file absolute": _frame(
        wire.Kind.ASSIGN, dict(ASSIGN, manifest=[dict(ASSIGN["manifest"][0], file="/etc/passwd")])
    ),
    "assign tensor offset negative": _frame(
        wire.Kind.ASSIGN, dict(ASSIGN, manifest=[dict(ASSIGN["manifest"][0], offset=-1)])
    ),
    **{
        f"assign gguf spec {why}": _frame(
            wire.Kind.ASSIGN, dict(ASSIGN, hub="", manifest=[dict(GGUF_SPEC, sha256=SHA, **change)])
        )
        for why, change in {
            "unknown type": {"gguf_type": "IQ2_XXS"},
            "type not a string": {"gguf_type": 8},
            "bytes short of the blocks": {"nbytes": 64 * 34 - 1},
            "bytes beyond the blocks": {"nbytes": 64 * 34 + 34},
            "row not whole blocks": {"shape": [2, 48], "nbytes": 34 * 3},
            "not U8": {"dtype": "F32"},
            "from a hub file": {"file": "model.gguf"},
            "empty shape": {"shape": [], "nbytes": 0},
            "zero dim": {"shape": [0, 64], "nbytes": 0},
            "too many dims": {"shape": [1, 1, 1, 2, 32], "nbytes": 68},
        }.items()
    },
    "recall no segments": _frame(wire.Kind.RECALL, {"step_id": 1, "epoch": 1, "segments": []}),
    "recall same request twice": _frame(
        wire.Kind.RECALL,
        {"step_id": 1, "epoch": 1, "segments": [{"request_id": 3, "start": 0, "length": 4, "want_logits": False}] * 2},
    ),
    "recall with payload": _frame(
        wire.Kind.RECALL,
        {"step_id": 1, "epoch": 1, "segments": [{"request_id": 3, "start": 0, "length": 4, "want_logits": False}]},
        b"x",
    ),
    "recall negative step": _frame(wire.Kind.RECALL, {"step_id": -1, "epoch": 1, "segments": []}),
    "leave finish missing": _frame(wire.Kind.LEAVE, {}),
    "leave finish not bool": _frame(wire.Kind.LEAVE, {"finish": 1}),
    "leave finish string": _frame(wire.Kind.LEAVE, {"finish": "true"}),
    "leave with payload": _frame(wire.Kind.LEAVE, {"finish": True}, b"x"),
    "deep json": _frame(wire.Kind.FREE, b"[" * 100000 + b"]" * 100000),
}


ROUTE = {"epoch": 1, "accept_token": "", "accept_cert": "", "next_address": "", "next_cert": "", "next_token": ""}
ROUTED = {"epoch": 1, "direct": False, "connect_ms": 0, "reason": ""}
BAD_FRAMES |= {
    "route token not hex": _frame(wire.Kind.ROUTE, ROUTE | {"accept_token": "secret!" * 8}),
    "route token too short": _frame(wire.Kind.ROUTE, ROUTE | {"next_token": "ab"}),
    "route next without token": _frame(wire.Kind.ROUTE, ROUTE | {"next_address": "10.0.0.2:7001"}),
    "route address without port": _frame(wire.Kind.ROUTE, ROUTE | {"next_address": "10.0.0.2", "next_token": "a" * 32}),
    "route address with a path": _frame(
        wire.Kind.ROUTE, ROUTE | {"next_address": "evil.example/x:80", "next_token": "a" * 32}
    ),
    "route cert too long": _frame(wire.Kind.ROUTE, ROUTE | {"accept_cert": "x" * (wire.MAX_CERT_CHARS + 1)}),
    "routed direct not bool": _frame(wire.Kind.ROUTED, {"epoch": 1, "direct": 1, "connect_ms": 0, "reason": ""}),
    "routed mapped without port": _frame(wire.Kind.ROUTED, ROUTED | {"mapped": "25.0.0.11"}),
    "routed mapped with a path": _frame(wire.Kind.ROUTED, ROUTED | {"mapped": "evil.example/x:80"}),
    "routed mapped not a string": _frame(wire.Kind.ROUTED, ROUTED | {"mapped": 7734}),
    "step forward not bool": _frame(wire.Kind.STEP, _step_header(forward="yes"), GOOD_PAYLOAD),
    "step trail negative": _frame(wire.Kind.STEP, _step_header(trail=[0.1, -1.0]), GOOD_PAYLOAD),
    "step trail not list": _frame(wire.Kind.STEP, _step_header(trail=0.1), GOOD_PAYLOAD),
    "step held negative": _frame(wire.Kind.STEP, _step_header(held=[0.1, -1.0]), GOOD_PAYLOAD),
    "step held too long": _frame(wire.Kind.STEP, _step_header(held=[0.1] * 1025), GOOD_PAYLOAD),
    "part empty": _frame(wire.Kind.PART, {"last": True}),
    "part too long": _frame(wire.Kind.PART, {"last": True}, b"x" * (wire.PART_BYTES + 1)),
    "part last not bool": _frame(wire.Kind.PART, {"last": 1}, b"x"),
    "step loop negative": _frame(wire.Kind.STEP, _step_header(loop=-1, draws=[[0, 1, 0]]), GOOD_PAYLOAD),
    "step loop too long": _frame(wire.Kind.STEP, _step_header(loop=wire.MAX_LOOP + 1, draws=[[0, 1, 0]]), GOOD_PAYLOAD),
    "step loop not int": _frame(wire.Kind.STEP, _step_header(loop=True, draws=[[0, 1, 0]]), GOOD_PAYLOAD),
    "step loop without draws": _frame(wire.Kind.STEP, _step_header(loop=2), GOOD_PAYLOAD),
    "step draws without loop": _frame(wire.Kind.STEP, _step_header(draws=[[0, 1, 0]]), GOOD_PAYLOAD),
    "step draw top_p zero": _frame(wire.Kind.STEP, _step_header(loop=1, draws=[[0.5, 0, 0]]), GOOD_PAYLOAD),
    "step draw hot": _frame(wire.Kind.STEP, _step_header(loop=1, draws=[[1000.0, 1, 0]]), GOOD_PAYLOAD),
    "step draw negative seed": _frame(wire.Kind.STEP, _step_header(loop=1, draws=[[0, 1, -1]]), GOOD_PAYLOAD),
    "step draw not a triple": _frame(wire.Kind.STEP, _step_header(loop=1, draws=[[0, 1]]), GOOD_PAYLOAD),
    "result tokens negative": _frame(
        wire.Kind.RESULT,
        {"step_id": 1, "epoch": 0, "compute_seconds": 0, "worker_seconds": 0, "tokens": [-1]}
        | {"tensor": {"dtype": "int64", "shape": [2]}},
        GOOD_PAYLOAD,
    ),
    "assign draft model before the last layer": _frame(wire.Kind.ASSIGN, dict(ASSIGN, draft_model="/models/small")),
    "assign tapes at the range's end": _frame(wire.Kind.ASSIGN, dict(ASSIGN, tapes=[10])),
    "assign tapes unsorted": _frame(wire.Kind.ASSIGN, dict(ASSIGN, tapes=[7, 3])),
    "assign tapes not ints": _frame(wire.Kind.ASSIGN, dict(ASSIGN, tapes=["3"])),
    "assign tapes not a list": _frame(wire.Kind.ASSIGN, dict(ASSIGN, tapes=3)),
    "assign draft manifest entry bad": _frame(
        wire.Kind.ASSIGN,
        dict(ASSIGN, layer_end=30, draft_model="e" * 64, draft_manifest=[dict(ASSIGN["manifest"][0], nbytes=-1)]),
    ),
    "ready draft seconds negative": _frame(
        wire.Kind.READY,
        {"epoch": 1, "hidden_size": 8, "vocab_size": 8, "load_seconds": 0, "weight_bytes": 0, "draft_seconds": -1},
    ),
    "step draw model k too big": _frame(
        wire.Kind.STEP,
        _step_header(loop=1, draws=[[0, 1, 0, 4, 9, [], [], wire.MAX_DRAFTS + 1]]),
        GOOD_PAYLOAD,
    ),
    "result by model not bool": _frame(
        wire.Kind.RESULT,
        {"step_id": 1, "epoch": 0, "compute_seconds": 0, "worker_seconds": 0, "tokens": [1], "by_model": [1]}
        | {"tensor": {"dtype": "int64", "shape": [2]}},
        GOOD_PAYLOAD,
    ),
    "failure unsent not bool": _frame(wire.Kind.FAILURE, {"message": "x", "step_id": 1, "unsent": 1}),
    "hello hop host with a path": _frame(wire.Kind.HELLO, HELLO | {"hop_host": "a/b"}),
    "hello hop port too big": _frame(wire.Kind.HELLO, HELLO | {"hop_port": 70000}),
    "hello hop relay no port": _frame(wire.Kind.HELLO, HELLO | {"hop_relay": "25.0.0.100"}),
    "hello hop relay not text": _frame(wire.Kind.HELLO, HELLO | {"hop_relay": 7735}),
    "route next relay without a token": _frame(
        wire.Kind.ROUTE, ROUTE | {"next_cert": "-----BEGIN", "next_relay": "25.0.0.100:7735"}
    ),
    "route next relay without the next certificate": _frame(
        wire.Kind.ROUTE, ROUTE | {"next_token": "ef" * 16, "next_relay": "25.0.0.100:7735"}
    ),
    "route next relay with a path": _frame(
        wire.Kind.ROUTE, ROUTE | {"next_cert": "x", "next_token": "ef" * 16, "next_relay": "a/b:7735"}
    ),
    "routed through not an address": _frame(wire.Kind.ROUTED, ROUTED | {"direct": True, "through": "relay"}),
    "fill without layers": _frame(wire.Kind.FILL, FILL_HEADER | {"layers": None}, GOOD_PAYLOAD),
    "fill inverted layers": _frame(wire.Kind.FILL, FILL_HEADER | {"layers": [4, 2]}, GOOD_PAYLOAD),
    "fill layers not ints": _frame(wire.Kind.FILL, FILL_HEADER | {"layers": [0, 2.5]}, GOOD_PAYLOAD),
    "fill three layers": _frame(wire.Kind.FILL, FILL_HEADER | {"layers": [0, 2, 4]}, GOOD_PAYLOAD),
    "fill short payload": _frame(wire.Kind.FILL, FILL_HEADER, GOOD_PAYLOAD[:-1]),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_frames_are_protocol_errors(name):
    with pytest.raises(ProtocolError):
        decode(BAD_FRAMES[name])


def test_the_valid_headers_used_above_decode():
    assert decode(_frame(wire.Kind.ROUTED, ROUTED)) == Routed(1, False)  # a worker that maps nothing says nothing
    assert decode(_frame(wire.Kind.HELLO, HELLO)).hop_relay == ""  # an older worker's Hello: no relay named
    assert decode(_frame(wire.Kind.ROUTE, ROUTE)) == Route(1)  # an older master's Route: no relay
    assert decode(_frame(wire.Kind.ROUTED, ROUTED | {"mapped": "[2a0f:ff00::5]:7734"})).mapped == "[2a0f:ff00::5]:7734"
    assert isinstance(decode(_frame(wire.Kind.STEP, _step_header(), GOOD_PAYLOAD)), Step)
    assert isinstance(decode(_frame(wire.Kind.FILL, FILL_HEADER, GOOD_PAYLOAD)), wire.Fill)
    assert decode(_frame(wire.Kind.FAILURE, {"message": "x", "step_id": 1})) == Failure("x", 1)  # an older worker's
    looping = decode(_frame(wire.Kind.STEP, _step_header(loop=1, draws=[[0.5, 1, 3]]), GOOD_PAYLOAD))
    assert isinstance(looping, Step) and looping.draws == (wire.Draw(0.5, 1.0, 3),)
    result = {"step_id": 1, "epoch": 0, "compute_seconds": 0, "worker_seconds": 0, "tokens": [1]}
    assert decode(_frame(wire.Kind.RESULT, result | {"tensor": {"dtype": "int64", "shape": [2]}}, GOOD_PAYLOAD))
    assert decode(_frame(wire.Kind.HELLO, HELLO)) == MESSAGES[1]  # so each spoiled copy fails for its one defect
    assert decode(_frame(wire.Kind.ASSIGN, ASSIGN)) == MESSAGES[4]
    gguf = decode(_frame(wire.Kind.ASSIGN, dict(ASSIGN, hub="", manifest=[dict(GGUF_SPEC, sha256=SHA)])))
    assert isinstance(gguf, Assign) and gguf.manifest[0].gguf_type == "Q8_0" and gguf.manifest[0].shape == (64, 64)


def test_frame_size_limit():
    frame = encode(Step(1, 0, (Segment(1, 0, 1000, True),), torch.zeros(1000, dtype=torch.int64)))
    decode(frame, max_frame_bytes=len(frame))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frame, max_frame_bytes=len(frame) - 1)


def test_decoded_tensor_is_writable_copy():
    frame = encode(Result(1, 0, 0.0, 0.0, torch.ones(3)))
    t = decode(frame).tensor
    t += 1  # must not touch the frame's bytes
    assert torch.equal(decode(frame).tensor, torch.ones(3))


def test_the_protocol_module_imports_only_the_standard_library_and_torch():
    """Both sides import wire.py: it must not pull in the model resolver, the weight cache or
    anything else of MoLink's."""
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(wire.__file__).read_text())
    froms = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in froms if n.level == 0 and n.module}
    assert not [n for n in froms if n.level > 0]  # no relative import of a sibling module
    assert roots - set(sys.stdlib_module_names) <= {"torch", "numpy"}
    assert "torch" in roots and "json" in roots  # the check sees the imports at all


def test_the_workers_frame_limit_follows_the_model_like_the_masters():
    # a tiny model: an Assign with its manifest (or a weight chunk) is the largest frame to accept
    assert wire.worker_frame_bound(512, 64, 384) == wire.UNASSIGNED_FRAME_BYTES
    # a big one: its steps and logits decide, exactly the master's bound for the same pipeline
    big = wire.worker_frame_bound(512, 8192, 128_256)
    assert big == wire.frame_bound(512, 8192, 128_256) > wire.UNASSIGNED_FRAME_BYTES
    # a step that does not fit the pipeline's bound is refused before any tensor is built
    bound = wire.worker_frame_bound(16, 64, 384)
    rows = bound // (64 * 4) + 1
    frame = encode(Step(1, 0, (Segment(1, 0, rows, True),), torch.zeros(rows, 64)))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(frame, bound)
