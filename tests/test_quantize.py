"""Group precision (none | int8 | int4): each worker quantizes its own decoder layers.

Measured against full precision: ``none`` stays token-identical to transformers; 8 and 4 bits
store the decoder layers in at most 0.3x and 0.2x the float32 bytes, keep a stage's outputs
close, and keep generated text close (bounds below were measured on this machine and set
with a margin; a broken quantizer, such as one that quantizes twice, fails all of them).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from harness import Cluster, greedy, run, without_copies
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.model_dims import ModelDims
from master_core.placement import Member
from worker_core.quantize import PRECISIONS, Precision, QuantizedExperts, module_bytes
from worker_core.shard import load_shard
from worker_core.stage import StageRunner
from worker_core.wire import QUANTIZE_CHOICES, Assign, ProtocolError, Segment, decode, encode

CPU = torch.device("cpu")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], list(range(20, 80)), [100, 50, 25, 12]]
TINY = ("llama", "qwen3_moe")  # a dense family and a mixture of experts (fused 3-D expert weights)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {arch: make_tiny_checkpoint(arch, root / arch, num_layers=6, seed=1) for arch in TINY}


def test_precisions_are_the_wire_choices():
    assert PRECISIONS == QUANTIZE_CHOICES == ("none", "int8", "int4")
    assert Precision.parse(" INT4 ") is Precision.INT4
    with pytest.raises(ValueError, match="int3"):
        Precision.parse("int3")


def test_assign_carries_the_precision_and_an_old_master_means_none():
    a = Assign(epoch=1, model="m", layer_start=0, layer_end=2, num_layers=4, max_batch_tokens=8, kv_tokens=64)
    q = Assign(**{**a.__dict__, "quantize": "int4"})
    back = decode(encode(q))
    assert isinstance(back, Assign) and back.quantize == "int4"
    old = encode(a).replace(b',"quantize":"none"', b"")  # a master from before the field
    assert b"quantize" not in old
    old = old[:5] + (int.from_bytes(old[5:9], "big") - len(b',"quantize":"none"')).to_bytes(4, "big") + old[9:]
    back = decode(old)
    assert isinstance(back, Assign) and back.quantize == "none"
    bad = encode(Assign(**{**a.__dict__, "quantize": "int3"}))
    with pytest.raises(ProtocolError, match="quantize"):
        decode(bad)


def _layers_bytes(shard) -> int:
    return sum(module_bytes(layer) for layer in shard.layers)


@pytest.mark.parametrize("arch", TINY)
def test_layer_bytes_shrink_and_the_master_counts_them(tiny, arch):
    path = tiny[arch]
    dims = ModelDims.load(path)
    full = load_shard(path, 1, 4, CPU, torch.float32)
    base = _layers_bytes(full)
    assert full.weight_bytes == base  # a middle stage holds only its layers
    # the aims (0.3x, 0.2x) hold on the default model (below); on these 64-wide layers
    # bitsandbytes' fixed code books per 4-bit matrix weigh a few per cent more
    for precision, most in ((Precision.INT8, 0.3), (Precision.INT4, 0.22)):
        shard = load_shard(path, 1, 4, CPU, torch.float32, precision)
        assert shard.precision is precision
        real = _layers_bytes(shard)
        assert real == shard.weight_bytes
        assert real <= most * base, f"{precision.value}: {real / base:.3f} of float32"
        # the quantized storage really is 8 or 4 bits (not a float copy beside it)
        layer = shard.layers[0]
        q_proj: torch.nn.Module = layer.get_submodule("self_attn.q_proj")
        assert type(q_proj).__name__ == ("Linear8bitLt" if precision is Precision.INT8 else "Linear4bit")
        assert next(q_proj.parameters()).dtype in (torch.int8, torch.uint8)
        # int4 keeps the value and down projections in int8 (as Q4_K_M gives them more bits)
        v_proj: torch.nn.Module = layer.get_submodule("self_attn.v_proj")
        assert type(v_proj).__name__ == "Linear8bitLt"
        if not arch.endswith("moe"):
            assert type(layer.get_submodule("mlp.down_proj")).__name__ == "Linear8bitLt"
        if arch.endswith("moe"):
            assert isinstance(layer.get_submodule("mlp.experts").gate_up_proj, QuantizedExperts)
        # the master's estimate (model_dims) leaves out only bitsandbytes' fixed tables per
        # matrix (a 4-bit matrix keeps about 1.2 kB of code books: nothing on a real model,
        # see the default-model test, a share of these 64-wide layers)
        matrices = sum(1 for m in shard.layers.modules() if type(m).__name__.startswith("Linear")) + sum(
            len(v) for m in shard.layers.modules() for v in vars(m).values() if isinstance(v, QuantizedExperts)
        )
        estimate = dims.stage_bytes(1, 4, precision, 4)
        assert 0 <= real - estimate <= 0.02 * real + 1300 * matrices, (estimate, real, matrices)
    assert dims.stage_bytes(1, 4, Precision.NONE, 4) == base


@pytest.mark.parametrize("arch", TINY)
def test_every_quantized_matrix_computes_close_to_its_float_original(tiny, arch):
    """Each replaced matrix of a layer, on random inputs, against the float32 original (measured:
    int8 about 0.004, NF4 about 0.09 relative error).  Whole random tiny models amplify such
    errors chaotically, so model-level closeness is measured on the default model below."""
    path = tiny[arch]
    full = load_shard(path, 2, 3, CPU, torch.float32).layers[0]
    torch.manual_seed(0)
    for precision, most in ((Precision.INT8, 0.01), (Precision.INT4, 0.12)):
        layer = load_shard(path, 2, 3, CPU, torch.float32, precision).layers[0]
        checked = 0
        for name, module in layer.named_modules():
            original = full.get_submodule(name)
            if type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
                assert isinstance(original, torch.nn.Linear)
                x = torch.randn(8, original.in_features)
                with torch.inference_mode():
                    want, got = original(x), module(x)
            else:
                experts = [(k, v) for k, v in vars(module).items() if isinstance(v, QuantizedExperts)]
                if not experts:
                    continue
                k, q = experts[0]
                want, got = getattr(original, k).data, torch.stack([q[e] for e in range(len(q))])
                assert got.shape == want.shape and got.dtype == want.dtype
            err = float((got - want).norm() / want.norm())
            assert err < most, (name, precision.value, err)
            checked += 1
        assert checked >= (5 if arch.endswith("moe") else 7)  # q k v o (+ gate up down, or the experts)


def test_activations_travel_in_the_compute_dtype(tiny):
    """A GPU stage computes in bfloat16 (device.pick); its activations leave in bfloat16."""
    path = tiny["llama"]
    shard = load_shard(path, 0, 3, CPU, torch.bfloat16, Precision.INT8)
    hidden = StageRunner(shard, 1024, 256).run((Segment(1, 0, 4, False),), torch.tensor([5, 6, 7, 8]))
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (4, 64)
    last = load_shard(path, 3, 6, CPU, torch.bfloat16, Precision.INT8)
    logits = StageRunner(last, 1024, 256).run((Segment(1, 0, 4, True),), hidden)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())


def _agreement(outs: list[list[int]], refs: list[list[int]]) -> float:
    """Share of generated tokens equal to full precision's at the same position."""
    same = sum(a == b for o, r in zip(outs, refs) for a, b in zip(o, r))
    return same / sum(len(r) for r in refs)


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY)
def test_every_precision_through_three_stages_on_tiny_families(tiny, arch, monkeypatch):
    without_copies(monkeypatch)  # the middle stage's bytes are its own layers' (a copy would add the head)
    path = tiny[arch]
    refs = [reference_greedy(path, p, 16) for p in PROMPTS]
    got, sizes = {}, {}
    for precision in PRECISIONS:

        async def main(q=precision):
            async with Cluster(path, workers=3, quantize=q) as c:
                assert len(c.master.group.stages) == 3
                sizes[q] = [s.ready.weight_bytes if s.ready else 0 for s in c.master.group.stages]
                return [r[0] for r in await asyncio.gather(*(c.engine.generate(p, greedy(16)) for p in PROMPTS))]

        got[precision] = run(main())
    assert got["none"] == refs  # lossless: token-identical to transformers
    for q in ("int8", "int4"):
        assert all(len(o) == 16 for o in got[q])
        assert sizes[q][1] < 0.3 * sizes["none"][1]  # the middle stage holds only quantized layers
    # random tiny weights make near-ties common, so only the first token is compared here (the
    # default model below compares whole answers); measured: int8 4/4 first tokens on llama
    firsts = {q: sum(o[0] == r[0] for o, r in zip(got[q], refs)) for q in ("int8", "int4")}
    assert firsts["int8"] >= 3, firsts


@pytest.mark.slow
def test_every_precision_through_three_stages_on_the_default_model():
    from transformers import AutoTokenizer

    from worker_core.default_model import ensure_default_model

    folder = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(folder)
    questions = [
        "Name three colours of the rainbow.",
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain gravity to a child.",
    ]
    prompts = [
        tok(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    refs = [reference_greedy(folder, p, 32) for p in prompts]
    got = {}
    for precision in PRECISIONS:

        async def main(q=precision):
            async with Cluster("default", workers=3, quantize=q) as c:  # the four side by side
                return [r[0] for r in await asyncio.gather(*(c.engine.generate(p, greedy(32)) for p in prompts))]

        got[precision] = run(main(), timeout=600)
    assert got["none"] == refs
    # measured: int8 0.97 (three answers identical, one from token 28), int4 0.13 (the first
    # tokens agree, then 4-bit SmolLM2-135M drifts; see docs/benchmarks.md for its perplexity)
    assert _agreement(got["int8"], refs) >= 0.85
    assert _agreement(got["int4"], refs) >= 0.06
    assert sum(o[0] == r[0] for o, r in zip(got["int4"], refs)) >= 3


def test_a_group_that_cannot_hold_the_model_is_told_the_precision_that_fits(tiny):
    """Fabricated members: too little memory at float32, enough at int4 (model_dims.lightest_fit),
    then a real group with that memory cannot place at none and serves at int4."""
    path = tiny["llama"]
    dims = ModelDims.load(path)
    need = {p: dims.stage_bytes(0, 6, p, 4) + 6 * dims.kv_bytes(4) * 2048 for p in Precision}
    assert need[Precision.INT4] < need[Precision.INT8] < need[Precision.NONE]
    offer = (need[Precision.INT4] + need[Precision.INT8]) // 2  # one member: fits at int4 only
    assert dims.lightest_fit([Member("a", offer, 1.0)], 4) is Precision.INT4
    assert dims.lightest_fit([Member("a", need[Precision.INT4] // 2, 1.0)], 4) is None

    async def serve_int4() -> list[int]:
        async with Cluster(path, workers=1, quantize="int4", worker_options=[{"memory_limit": offer}]) as c:
            return (await c.engine.generate(PROMPTS[0], greedy(4)))[0]

    problem = run(_refused(path, "none", offer), timeout=120)
    assert problem is not None and "at --quantize none" in problem and "at --quantize int4 it would fit" in problem
    assert len(run(serve_int4(), timeout=180)) == 4


@pytest.mark.slow
def test_the_master_counts_a_default_model_stage_as_the_worker_holds_it():
    """SmolLM2-135M, layers [10, 20): the worker's bytes and the master's estimate within 2 %,
    and the aims of issue 16 for the decoder layers: int8 <= 0.3x, int4 <= 0.2x of float32."""
    from worker_core.default_model import ensure_default_model

    folder = ensure_default_model()
    dims = ModelDims.load(folder)
    full = load_shard(folder, 10, 20, CPU, torch.float32).weight_bytes
    assert full == dims.stage_bytes(10, 20, Precision.NONE, 4)
    for precision, most in ((Precision.INT8, 0.3), (Precision.INT4, 0.2)):
        real = load_shard(folder, 10, 20, CPU, torch.float32, precision).weight_bytes
        assert real <= most * full
        assert abs(dims.stage_bytes(10, 20, precision, 4) - real) <= 0.02 * real


def test_cards_of_24_gb_hold_a_70b_model_at_4_bits_and_not_at_16():
    """The planner in quantized bytes (fp16 compute on GPUs): Llama-3-70B on 23 GB usable per card."""
    from master_core.placement import PlacementError
    from master_core.simulator import LLAMA3_70B, cards_to_hold, kv_tokens_on_cards

    card = 23 * 10**9
    assert cards_to_hold(LLAMA3_70B, card, Precision.NONE) == 7  # 141 GB of fp16 weights
    assert cards_to_hold(LLAMA3_70B, card, Precision.INT8) == 4
    assert cards_to_hold(LLAMA3_70B, card, Precision.INT4) == 3  # its value and down projections in int8
    four = [Member(str(i), card, 1.0) for i in range(4)]
    assert LLAMA3_70B.lightest_fit(four, 2) is Precision.INT8
    assert LLAMA3_70B.lightest_fit(four[:3], 2) is Precision.INT4
    assert LLAMA3_70B.lightest_fit(four[:2], 2) is None
    # the simulator's 70B rows: 4 cards at 4 bits near the KV cap, 8 at fp16 less room
    assert 50_000 < kv_tokens_on_cards(LLAMA3_70B, 4, card, Precision.INT4) <= 65536
    assert 20_000 < kv_tokens_on_cards(LLAMA3_70B, 8, card, Precision.NONE) < 65536
    with pytest.raises(PlacementError, match="GB more"):
        kv_tokens_on_cards(LLAMA3_70B, 4, card, Precision.NONE)


def test_probe_says_how_many_layers_of_common_models_this_machine_holds():
    from app.cli.worker import _layers_held_line
    from master_core.placement import layers_held
    from master_core.simulator import LLAMA3_70B

    card = 23 * 10**9
    held = [layers_held(LLAMA3_70B.shape(p, 2), card) for p in Precision]
    assert held[0] < held[1] < held[2] < LLAMA3_70B.num_layers  # fp16 < int8 < int4, and not all of it
    # consistent with the planner: two such cards cannot hold the 4-bit model (the embeddings and
    # head take room at the ends), three can
    assert 2 * held[2] <= LLAMA3_70B.num_layers <= 3 * held[2]
    line = _layers_held_line(card, 2)
    assert f"Llama-3-70B {held[0]} / {held[1]} / {held[2]} of 80" in line and "21.4 GiB" in line
    assert "Llama-3-70B 0 / 0 / 0 of 80" in _layers_held_line(10**8, 2)


def test_the_evaluation_text_ships_with_the_package_and_is_long_enough():
    from transformers import AutoTokenizer

    from app.tools.evaluate import EvalOptions, eval_text
    from worker_core.default_model import ensure_default_model

    text = eval_text()
    assert text.lstrip().startswith("CHAPTER I.") and "Alice" in text
    ids = AutoTokenizer.from_pretrained(ensure_default_model())(text, add_special_tokens=False)["input_ids"]
    windows, length = EvalOptions().windows
    assert len(ids) >= windows * length >= 10_000


def test_agreement_and_table():
    from app.tools.evaluate import agreement, table

    assert agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 0, 6]]) == 4 / 6
    row = {
        "weight_bytes": [3e6, 2e6],
        "decoder_bytes": 4e6,
        "peak_rss": [1e8, 1e8],
        "decode_tokens_per_s": 10.0,
        "ttft_s": 0.5,
        "perplexity": 20.0,
        "agreement": 1.0,
    }
    text = table([{**row, "precision": "none"}, {**row, "precision": "int4", "decoder_bytes": 1e6, "perplexity": 22.0}])
    assert "| int4 | 3 / 2 | 0.25x |" in text and "+10.0%" in text


@pytest.mark.slow
def test_perplexity_through_the_pipeline_equals_transformers(tiny):
    """`molink eval`'s perplexity pass over 3 real stages at full precision gives the
    perplexity transformers computes over the same windows in one process."""
    from transformers import AutoModelForCausalLM

    from app.tools.evaluate import perplexity

    path = tiny["llama"]
    tokens = [(37 * i + 11) % 380 + 3 for i in range(4 * 40)]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor(tokens).view(4, 40)
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[:, :-1]  # [4, 39, vocab]
        want = float(torch.exp(-logp.gather(2, ids[:, 1:].unsqueeze(2)).mean()))

    async def main():
        async with Cluster(path, workers=3) as c:
            return await perplexity(c.master, tokens, 4, 40, [])

    got, scored = run(main())
    assert scored == 4 * 39
    assert abs(got - want) <= 1e-4 * want, (got, want)


def test_master_and_group_create_take_the_precision():
    from app.cli import _parser
    from master_core.config import MasterConfig

    p = _parser()
    assert p.parse_args(["master"]).quantize == "none"
    assert p.parse_args(["master", "--quantize", "int4"]).quantize == "int4"
    assert p.parse_args(["group", "create", "--quantize", "int8"]).quantize == "int8"
    with pytest.raises(SystemExit):
        p.parse_args(["master", "--quantize", "fp8"])
    with pytest.raises(ValueError, match="quantize"):
        MasterConfig(quantize="fp8").validate()
    args = p.parse_args(["eval", "--quick", "--precisions", "none,int4"])
    assert args.quick and args.precisions == "none,int4"


def test_the_master_side_counts_precision_without_torch():
    """model_dims and the simulator (no torch, see their contracts) know the precisions."""
    import subprocess
    import sys

    code = "import sys, master_core.simulator, master_core.model_dims; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


async def _refused(path, quantize: str, memory_limit: int | None) -> str | None:
    """The problem a one-worker group states when it cannot place or load (None: it served)."""
    from master_core.config import MasterConfig
    from master_core.group import GroupState
    from master_core.server import Master
    from worker_core.worker import WorkerConfig, serve

    master = Master(MasterConfig(model=str(path), port=0, min_workers=1, quantize=quantize))
    await master.start()
    cfg = WorkerConfig(master=master.address, device="cpu", name="w", reconnect=False, memory_limit=memory_limit)
    task = asyncio.create_task(serve(cfg))
    try:
        for _ in range(3000):
            if master.group.state is GroupState.CANNOT_PLACE:
                return master.group.problem
            if master.group.serving:
                return None
            await asyncio.sleep(0.02)
        raise TimeoutError(f"neither placed nor refused: {master.group.problem}")
    finally:
        await master.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_worker_that_ignores_the_precision_is_refused(tiny, monkeypatch):
    """A worker older than Assign.quantize loads full precision: the group says so instead of
    overfilling that member's memory."""
    import worker_core.session

    monkeypatch.setattr(worker_core.session, "Precision", lambda _text: Precision.NONE)
    problem = run(_refused(tiny["llama"], "int4", None), timeout=120)
    assert problem is not None and "did not store its layers at --quantize int4" in problem
    monkeypatch.undo()
    assert run(_refused(tiny["llama"], "int4", None), timeout=120) is None
