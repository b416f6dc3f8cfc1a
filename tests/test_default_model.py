"""The embedded default model: atomic lossless conversion, and 3 stages = one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from harness import Cluster, greedy, run
from safetensors import safe_open
from tiny_models import reference_greedy

from worker_core import default_model
from worker_core.default_model import MARKER, default_model_dir, ensure_default_model

pytestmark = pytest.mark.slow  # converts and runs the real SmolLM2-135M, spawns demo processes


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    t0 = time.perf_counter()
    folder = ensure_default_model(root)
    return root, folder, time.perf_counter() - t0


def test_conversion_is_complete_and_lossless(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, folder, _ = converted
    assert folder == default_model_dir(root)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MARKER):
        assert (folder / name).is_file(), name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    gguf = default_model._gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert all(f.get_tensor(n).dtype == torch.float32 for n in names[:5])
        for n in (
            "model.embed_tokens.weight",
            "model.layers.7.self_attn.q_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
        ):
            assert torch.equal(f.get_tensor(n), ref[n]), n
    assert len(names) == len([k for k in ref if k != "lm_head.weight"])


def test_second_call_does_not_convert(converted, monkeypatch):
    root, folder, _ = converted

    def boom(*a):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "_convert", boom)
    t0 = time.perf_counter()
    assert ensure_default_model(root) == folder
    assert time.perf_counter() - t0 < 5  # no conversion (boom above); a conversion takes far longer


def test_interrupted_conversion_never_looks_complete(tmp_path, monkeypatch):
    calls = []

    def interrupted(gguf, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the user pressed Ctrl-C midway

    monkeypatch.setattr(default_model, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(tmp_path)
    final = default_model_dir(tmp_path)
    assert not final.exists() and not calls[0].exists()
    # a final folder without the marker (e.g. copied by hand, or an old crash) is redone (by a
    # stand-in conversion: the real one is checked above, on the module's converted copy)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")

    def converts(gguf, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"converted")

    monkeypatch.setattr(default_model, "_convert", converts)
    folder = ensure_default_model(tmp_path)
    assert folder == final and len(calls) == 2 and not calls[1].exists()  # made aside, then renamed
    assert (folder / MARKER).exists() and (folder / "model.safetensors").read_bytes() == b"converted"
    assert not (folder / "config.json").exists()  # the stale folder was replaced, not merged


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


async def _tool_flow(c: Cluster) -> tuple[dict, str]:
    """The agent loop on the embedded model (its template has no tool format: the generic one):
    a required call with valid arguments, streamed and not, then the tool's result and an answer."""
    import openai

    client = openai.AsyncOpenAI(base_url=c.base_url + "/v1", api_key="sk-default-tools", max_retries=0)
    try:
        msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
        ask = dict(
            model=c.master.model_id,
            messages=msgs,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,  # with more allowed, this small model calls again until max_tokens
            temperature=0,
        )
        r = await client.chat.completions.create(**ask, max_tokens=120)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls and len(ch.message.tool_calls) == 1, ch
        assert not (ch.message.content or "").strip(), ch
        call = ch.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and set(args) == {"city", "unit"}, args
        assert isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit")
        streamed = [x async for x in await client.chat.completions.create(**ask, max_tokens=120, stream=True)]
        pieces = [tc for x in streamed for chx in x.choices for tc in chx.delta.tool_calls or [] if tc.index == 0]
        assert json.loads("".join(tc.function.arguments or "" for tc in pieces if tc.function)) == args
        follow = [
            *msgs,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
        ]
        r2 = await client.chat.completions.create(
            model=c.master.model_id, messages=follow, tools=[WEATHER], max_tokens=40, temperature=0
        )
        answer = r2.choices[0]
        assert answer.finish_reason in ("stop", "length", "tool_calls"), answer
        return args, answer.message.content or ""
    finally:
        await client.close()


def test_default_model_three_stages_matches_transformers_and_runs_a_tool_loop():
    folder = ensure_default_model()
    from transformers import AutoTokenizer

    from master_core.tools import ToolFormat, tool_format

    tok = AutoTokenizer.from_pretrained(folder)
    assert tool_format(tok.chat_template) is ToolFormat.GENERIC
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    ref = reference_greedy(folder, prompt, 32)

    async def main():
        async with Cluster("default", workers=3, api_key="sk-default-tools") as c:
            assert [s.assignment.layer_end - s.assignment.layer_start for s in c.master.group.stages] == [10, 10, 10]
            tokens = (await c.engine.generate(prompt, greedy(32)))[0]
            args, answer = await _tool_flow(c)
            assert c.engine.held() == {"running": 0, "waiting": 0, "text_streams": 0}
            return tokens, args, answer

    tokens, args, answer = run(main())
    assert tokens == ref
    print(f"embedded model's tool call: {args}; its answer after the result: {answer!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_command_answers_and_exits_zero():
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--max-tokens", "12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stage 0:" in out.stdout and "stage 2:" in out.stdout and "layers [20, 30)" in out.stdout
    assert "tokens/s" in out.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is TerminateProcess there: no clean exit to check")
def test_demo_serve_stops_every_process_on_sigterm():
    import psutil

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "demo", "--serve", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                pass
            time.sleep(0.5)
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["usage"]["completion_tokens"] >= 1
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()


def test_any_gguf_file_is_a_model_source(tmp_path, monkeypatch):
    from worker_core import gguf_source, model_source

    monkeypatch.setattr(default_model, "_models_dir", lambda root: tmp_path / "models")
    gguf = default_model._gguf_path()
    folder = model_source.resolve(str(gguf))
    assert folder.parent == tmp_path / "models" and (folder / MARKER).exists()
    assert not list(folder.glob("*.safetensors"))  # a tensor table over the file, no weights
    table = gguf_source.open_folder(folder)
    assert table is not None and table.tensors["model.norm.weight"].ggml_type == "F32"
    assert table.load("model.norm.weight").dtype == torch.float32
    assert model_source.resolve(str(gguf)) == folder  # made once
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 16)
    with pytest.raises(model_source.ModelSourceError, match="unsupported model file"):
        model_source.resolve(str(bad))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF-not-really")
    with pytest.raises(model_source.ModelSourceError, match="cannot read this GGUF"):
        model_source.resolve(str(fake))
