"""GGUF models kept small: a quantized file is read range by range, travels as its blocks, and
gives transformers' tokens; no process ever holds the whole model in float32."""

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from harness import Cluster, greedy, paired_config, run, without_copies
from tiny_models import make_tiny_gguf, reference_greedy_gguf

from worker_core import default_model, gguf_source, model_source
from worker_core.shard import needed_tensors
from worker_core.wire import GGUF_TYPES, TensorSpec, gguf_nbytes

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], list(range(20, 80))]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(default_model, "_models_dir", lambda _root: root / "models")
        yield root / "models"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {q: make_tiny_gguf(root / f"tiny-{q}.gguf", q, num_layers=4, seed=3) for q in ("Q8_0", "Q4_0")}


def _f32_bytes(folder: Path, names: list[str]) -> int:
    table = gguf_source.open_folder(folder)
    assert table is not None
    return sum(4 * math.prod(table.tensors[n].shape) for n in names)


# ------------------------------------------------------------------ the folder and its errors


def test_resolve_makes_a_small_folder_and_clear_errors(ggufs, cache, tmp_path):
    src = ggufs["Q4_0"]
    folder = model_source.resolve(str(src))
    assert folder.parent == cache and model_source.resolve(str(src)) == folder  # made once
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert not [n for n in files if n.endswith((".safetensors", ".bin", ".gguf", ".pt"))], files
    assert "model.safetensors.index.json" not in files and "tokenizer.json" in files and "config.json" in files
    side = json.loads((folder / gguf_source.SIDECAR).read_text())
    assert side["source"] == {"path": str(src.resolve()), "size": src.stat().st_size}
    assert sum(files.values()) - files["tokenizer.json"] < src.stat().st_size / 4  # no weights, only text
    types = {e["type"] for e in side["tensors"].values()}
    assert types == {"Q4_0", "F32"}

    for bad, why in [
        (b"GGUF-not-really", "cannot read this GGUF"),
        (src.read_bytes()[: src.stat().st_size // 2], "shorter than its tensor table|cannot read this GGUF"),
    ]:
        path = tmp_path / f"bad-{len(bad)}.gguf"
        path.write_bytes(bad)
        with pytest.raises(model_source.ModelSourceError, match=why):
            model_source.resolve(str(path))

    odd = make_tiny_gguf(
        tmp_path / "iq.gguf", "Q8_0", num_layers=1, hidden_size=256, raw_types={"blk.0.ffn_up.weight": "IQ2_XXS"}
    )
    with pytest.raises(model_source.ModelSourceError, match="blk.0.ffn_up.weight is stored as IQ2_XXS"):
        model_source.resolve(str(odd))
    with pytest.raises(gguf_source.GgufError, match="IQ2_XXS is not supported"):
        gguf_source.dequantize(np.zeros(66, np.uint8), "IQ2_XXS", (256,), "x", "llama", None)


def test_the_wire_block_table_is_ggufs_and_every_type_dequantizes_as_gguf_does(monkeypatch):
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setattr(gguf_source, "_CHUNK_ELEMENTS", 700)  # several row chunks per tensor
    rng = np.random.default_rng(0)
    for name, (block, size) in GGUF_TYPES.items():
        qtype = gguf.GGMLQuantizationType[name]
        assert gguf.GGML_QUANT_SIZES[qtype] == (block, size)
        shape = (12, 2 * max(block, 32))
        raw = rng.integers(0, 256, gguf_nbytes(name, shape), dtype=np.uint8)
        if name in ("F32", "F16", "BF16"):  # finite values, not random bit patterns
            raw = np.frombuffer(rng.standard_normal(math.prod(shape)).astype(np.float32).tobytes(), np.uint8)
            raw = raw if name == "F32" else raw.reshape(-1, 4)[:, 2:].reshape(-1).copy()
        want = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).reshape(shape)
        got = gguf_source.dequantize(raw, name, shape, "blk.0.ffn_up.weight", "llama", config)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want, equal_nan=True), name
    # llama's q rows come back in Hugging Face order (transformers' own processor)
    raw = rng.standard_normal((16, 32)).astype(np.float32)
    q = gguf_source.dequantize(raw.view(np.uint8).reshape(-1), "F32", (16, 32), "blk.0.attn_q.weight", "llama", config)
    assert not torch.equal(q, torch.from_numpy(raw))
    assert sorted(map(tuple, q.tolist())) == sorted(map(tuple, raw.tolist()))  # the same rows, reordered
    with pytest.raises(ValueError, match="bytes do not hold"):
        TensorSpec.parse(
            {"name": "w", "dtype": "U8", "shape": [4, 32], "nbytes": 100, "sha256": "a" * 64, "gguf_type": "Q8_0"}
        )


# ------------------------------------------------------------------ tokens and bytes across three stages


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_three_stages_give_transformers_tokens_and_weights_travel_as_blocks(ggufs, cache, tmp_path, qtype):
    from master_core.server import Master
    from worker_core.identity import client_context, load_or_create
    from worker_core.pairing import join
    from worker_core.worker import WorkerConfig, serve

    src = ggufs[qtype]
    want = [reference_greedy_gguf(src, p, 16) for p in PROMPTS]
    served = {"bytes": 0}
    specs: list[TensorSpec] = []

    async def main():
        master = Master(paired_config(str(src), tmp_path / "m", min_workers=3))
        await master.start()
        weights, port = master.group.weights, master.group_port
        assert weights is not None and port is not None
        read, manifest = weights.read, weights.manifest

        def counting_read(sha, offset, length):
            data = read(sha, offset, length)
            served["bytes"] += len(data[0])
            return data

        def recording_manifest(start, end):
            out = manifest(start, end)
            specs.extend(out[1])
            return out

        weights.read, weights.manifest = counting_read, recording_manifest  # pyright: ignore[reportAttributeAccessIssue]
        tasks = []
        try:
            for name in ("alice", "bob", "carol"):
                ident = load_or_create(tmp_path / name / "identity", name)
                joined = await join("127.0.0.1", port.port, master.new_code(), name, ident.cert_pem)
                cfg = WorkerConfig(
                    master=f"127.0.0.1:{port.port}",
                    device="cpu",
                    tls=client_context(ident, joined.master_cert),
                    reconnect=False,
                    weights_dir=tmp_path / name / "weights",
                )
                tasks.append(asyncio.create_task(serve(cfg)))
            deadline = asyncio.get_running_loop().time() + 120
            while not (master.group.serving and len(master.group.stages) == 3):
                assert asyncio.get_running_loop().time() < deadline, master.group.problem
                await asyncio.sleep(0.05)
            got = await asyncio.gather(*(master.engine.generate(p, greedy(16)) for p in PROMPTS))
            return [g[0] for g in got], master.folder
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await master.stop()

    tokens, folder = run(main(), 300)
    assert tokens == want
    assert specs and all(s.gguf_type in (qtype, "F32") and s.dtype == "U8" for s in specs)
    blocks = sum(s.nbytes for s in {s.sha256: s for s in specs}.values())
    f32 = _f32_bytes(folder, sorted({s.name for s in specs}))
    ratio = {"Q8_0": 34 / 128, "Q4_0": 18 / 128}[qtype]
    print(f"{qtype}: {served['bytes'] / 1e6:.2f} MB served, blocks {blocks / 1e6:.2f} MB, float32 {f32 / 1e6:.2f} MB")
    assert served["bytes"] <= sum(s.nbytes for s in specs)  # nothing beyond the blocks (shared bytes once)
    assert served["bytes"] >= blocks * 0.99 and blocks < f32 * (ratio + 0.02)


def test_plain_folder_stages_read_the_gguf_file_themselves_and_quantize_applies(ggufs, cache, monkeypatch):
    without_copies(monkeypatch)  # the middle stage's bytes are its own layers' (a copy would add the head)
    folder = model_source.resolve(str(ggufs["Q8_0"]))
    want = [reference_greedy_gguf(ggufs["Q8_0"], p, 12) for p in PROMPTS[:2]]
    got, sizes = {}, {}
    for precision in ("none", "int8"):

        async def main(q=precision):
            async with Cluster(folder, workers=3, quantize=q) as c:
                sizes[q] = [s.ready.weight_bytes if s.ready else 0 for s in c.master.group.stages]
                return [(await c.engine.generate(p, greedy(12)))[0] for p in PROMPTS[:2]]

        got[precision] = run(main())
    assert got["none"] == want  # lossless: the dequantized GGUF, token-identical to transformers
    assert all(len(o) == 12 for o in got["int8"])
    assert 0 < sizes["int8"][1] < 0.35 * sizes["none"][1]  # --quantize applies to the dequantized layers


# ------------------------------------------------------------------ peak memory in real processes

_MASTER = """
import asyncio, json, sys
from harness import greedy, paired_config
from master_core.server import Master

async def main():
    m = Master(paired_config(sys.argv[1], sys.argv[2], min_workers=3))
    await m.start()
    hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    print(json.dumps({"port": m.group_port.port, "codes": [m.new_code() for _ in range(3)], "hwm": hwm}), flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 400
    while not (m.group.serving and len(m.group.stages) == 3) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    held = {s.member: s.assignment for s in m.group.stages}  # each range, with any copies (master_core.copies)
    ranges = {name: [0 if a.copy_first else a.layer_start, a.copy_end or a.layer_end] for name, a in held.items()}
    tokens = (await m.engine.generate([5, 6, 7, 8], greedy(4)))[0] if len(ranges) == 3 else []
    print(json.dumps({"ranges": ranges, "tokens": tokens, "problem": str(m.group.problem)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    await m.stop()

asyncio.run(main())
"""

_WORKER = """
import asyncio, sys
from pathlib import Path
import torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from worker_core.identity import client_context, load_or_create
from worker_core.pairing import join
from worker_core.worker import WorkerConfig, serve

if sys.argv[1] == "baseline":  # the same imports, nothing loaded
    print("ready", flush=True)
    sys.stdin.read()
    sys.exit(0)

async def main(port, code, home):
    home = Path(home)
    ident = load_or_create(home / "identity", home.name)
    joined = await join("127.0.0.1", port, code, home.name, ident.cert_pem)
    tls = client_context(ident, joined.master_cert)
    await serve(WorkerConfig(master=f"127.0.0.1:{port}", device="cpu", tls=tls, reconnect=False,
                             weights_dir=home / "weights", threads=1))

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _line(proc: subprocess.Popen, timeout: float) -> str:
    """One stdout line of a child, waited for at most ``timeout`` seconds."""
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise TimeoutError(f"child {proc.pid} said nothing in {timeout} s")
    return proc.stdout.readline()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.stdin and not p.stdin.closed:
            p.stdin.close()
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def test_peak_memory_of_master_and_workers_stays_near_what_each_holds(cache, tmp_path):
    # ~470 MB of float32 weights (a tied 49152 x 512 embedding and 24 layers), ~65 MB as Q4_0: enough
    # layers that the first stage (the embedding, dequantized whole once) holds well under half of it
    src = make_tiny_gguf(
        tmp_path / "big-Q4_0.gguf",
        "Q4_0",
        num_layers=24,
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_embeddings=True,
        seed=5,
    )
    folder = model_source.resolve(str(src))  # made here, so the master's peak is only serving
    (tmp_path / "master.py").write_text(_MASTER)
    (tmp_path / "worker.py").write_text(_WORKER)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")

    def spawn(*args: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-u", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        procs.append(p)
        return p

    procs: list[subprocess.Popen] = []
    try:
        baseline = spawn(str(tmp_path / "worker.py"), "baseline")
        master = spawn(str(tmp_path / "master.py"), str(folder), str(tmp_path / "m"))
        hello = json.loads(_line(master, 120))
        assert _line(baseline, 120).strip() == "ready"
        workers = []
        for i, code in enumerate(hello["codes"]):
            home = tmp_path / f"w{i}"
            home.mkdir()
            workers.append(spawn(str(tmp_path / "worker.py"), str(hello["port"]), code, str(home)))
        done = json.loads(_line(master, 420))
        assert len(done["ranges"]) == 3 and len(done["tokens"]) == 4, done
        base = _hwm(baseline.pid)
        peaks = [_hwm(w.pid) for w in workers]
        master_peak = _hwm(master.pid)
    finally:
        _stop(procs)

    table = gguf_source.open_folder(folder)
    assert table is not None
    whole = sum(4 * math.prod(t.shape) for t in table.tensors.values())
    blocks = sum(t.nbytes for t in table.tensors.values())
    print(
        f"\nmodel: float32 {whole / 1e6:.0f} MB, Q4_0 file blocks {blocks / 1e6:.0f} MB; "
        f"baseline worker {base / 1e6:.0f} MB"
    )
    for i, peak in enumerate(peaks):
        start, end = done["ranges"][f"w{i}"]
        share = _f32_bytes(folder, needed_tensors(folder, start, end))
        print(
            f"worker w{i} layers [{start}, {end}): peak {peak / 1e6:.0f} MB: "
            f"{(peak - base) / 1e6:.0f} MB over baseline, share {share / 1e6:.0f} MB in float32"
        )
        assert peak - base < 1.6 * share + 60e6, (peak, base, share)
        if end - start < 24:  # (a stage with copies of both neighbours may hold every layer)
            assert peak - base < whole  # never the whole model in float32
    started = hello["hwm"]
    print(
        f"master peak {master_peak / 1e6:.0f} MB: {(master_peak - base) / 1e6:.0f} MB over a baseline worker, "
        f"{(master_peak - started) / 1e6:.0f} MB over its own peak once started (tokenizer, config, tensor table)"
    )
    assert master_peak - base < 0.5 * whole  # holding the model in float32 would be > whole
    assert master_peak - started < 0.25 * whole  # delivering the blocks costs little
