"""Pure pieces of the master: placement, scheduler, sampling, text streaming, request lifecycle."""

import pytest
import torch

from master_core.placement import kv_token_budget
from master_core.request import Request, RequestState, SamplingParams
from master_core.sampling import sample as sample_row
from master_core.scheduler import Candidate, Chunk, microbatch_share, plan_microbatch
from master_core.text import TextStream
from worker_core.sampling import candidates


def test_kv_budget():
    assert kv_token_budget(10_000, 2_000, 4, cap=10**9) == 1000
    assert kv_token_budget(10_000, 2_000, 4, cap=100) == 100
    assert kv_token_budget(1_000, 5_000, 4, cap=100) == 1


def test_scheduler_decodes_first_then_chunked_prefill():
    cands = [Candidate(1, 0, 100, 0), Candidate(2, 9, 10, 1), Candidate(3, 0, 5, 2), Candidate(4, 4, 5, 3)]
    plan = plan_microbatch(cands, max_decodes=8, prefill_tokens=30)
    assert plan == [Chunk(2, 9, 1, True), Chunk(4, 4, 1, True), Chunk(1, 0, 30, False)]
    plan = plan_microbatch(cands, max_decodes=8, prefill_tokens=200)
    assert plan[2:] == [Chunk(1, 0, 100, True), Chunk(3, 0, 5, True)]
    assert plan_microbatch(cands, max_decodes=1, prefill_tokens=0, min_chunk=0) == [Chunk(2, 9, 1, True)]
    assert plan_microbatch(cands, max_decodes=1, prefill_tokens=0, min_chunk=4)[1:] == [Chunk(1, 0, 4, False)]
    assert plan_microbatch([], max_decodes=3, prefill_tokens=10) == []
    assert microbatch_share(10, 3) == 4 and microbatch_share(0, 3) == 1


def test_sampling_greedy_seeded_and_top_p():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    g = torch.Generator()
    assert sample(logits, SamplingParams(temperature=0), g, []).token_id == 1

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sample(logits, SamplingParams(temperature=1.0), gen, []).token_id for _ in range(30)]

    assert draws(7) == draws(7) and len(set(draws(7))) > 1
    # top_p tiny keeps only the most likely token
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.01), g, []).token_id for _ in range(20)} == {1}
    # a frequency penalty moves greedy away from a repeated token
    assert sample(logits, SamplingParams(temperature=0, frequency_penalty=1.0), g, [1]).token_id == 3
    s = sample(logits, SamplingParams(temperature=0, logprobs=2), g, [])
    assert [t for t, _ in s.top_logprobs] == [1, 3]
    assert s.logprob == pytest.approx(torch.log_softmax(logits, 0)[1].item())


def sample(logits, params, gen, previous, topk=0):
    if topk:
        v, i = torch.topk(logits, topk)
        row = torch.cat([torch.logsumexp(logits, 0, keepdim=True), v, i.float()])
    else:
        row = logits
    return sample_row(*candidates(row, topk), params, gen, previous)


def test_topk_rows_give_the_same_greedy_token_and_logprobs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=0, logprobs=3)
    full, top = sample(logits, p, torch.Generator(), []), sample(logits, p, torch.Generator(), [], topk=8)
    assert full.token_id == top.token_id and full.logprob == pytest.approx(top.logprob, abs=1e-5)
    assert [t for t, _ in full.top_logprobs] == [t for t, _ in top.top_logprobs]


class CharTok:
    """decode() of ids that are code points; 0 stands for half of a multi-byte character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) if i else "\ufffd" for i in ids)


def test_text_stream_stop_strings_and_holdback():
    t = TextStream(CharTok(), stop=("END",))
    out = []
    for ch in "hello EN":
        d, stopped = t.push(ord(ch))
        out.append(d)
        assert not stopped
    assert "".join(out) == "hello "  # "EN" could begin the stop string: held back
    d, stopped = t.push(ord("D"))
    assert stopped and "".join(out) + d == "hello "
    t2 = TextStream(CharTok(), stop=("END",))
    text = "".join(t2.push(ord(c))[0] for c in "ENx") + t2.flush()
    assert text == "ENx"


def test_text_stream_holds_back_incomplete_characters():
    t = TextStream(CharTok())
    assert t.push(ord("a")) == ("a", False)
    assert t.push(0) == ("", False)  # ends in U+FFFD: not final yet


def test_request_lifecycle_refuses_illegal_moves():
    r = Request(1, prompt=[1, 2], params=SamplingParams(max_tokens=3, seed=1))
    assert r.state is RequestState.QUEUED and r.tokens == [1, 2]
    r.move(RequestState.RUNNING)
    r.move(RequestState.QUEUED)
    r.move(RequestState.RUNNING)
    r.move(RequestState.DONE)
    with pytest.raises(RuntimeError):
        r.move(RequestState.RUNNING)


def test_group_state_moves_only_along_its_table_and_says_why():
    import asyncio

    from master_core.config import MasterConfig
    from master_core.group import Group, GroupState
    from master_core.model_dims import ModelDims

    dims = ModelDims(4, 64, 384, 512, 256, (1000,) * 4, 500, 500)

    async def main():
        g = Group(MasterConfig(min_workers=2), "m", dims)
        assert (g.state, g.serving, g.problem) == (GroupState.WAITING, False, "waiting for 2 worker(s)")
        with pytest.raises(ValueError):
            g.move(GroupState.SERVING)  # never straight from waiting
        g.move(GroupState.PLACING, "placing")
        assert g.state.building and not g.serving
        g.move(GroupState.LOADING, "loading")
        with pytest.raises(ValueError):
            g.move(GroupState.WAITING)  # a failed load goes back through placing
        waiter = asyncio.ensure_future(g.wait_serving())
        await asyncio.sleep(0)
        assert not waiter.done()
        g.move(GroupState.SERVING, "ignored")
        await asyncio.wait_for(waiter, 1)
        assert g.serving and g.problem is None and not g.state.building
        for illegal in (GroupState.LOADING, GroupState.WAITING, GroupState.CANNOT_PLACE):
            with pytest.raises(ValueError):
                g.move(illegal)
        g.move(GroupState.PLACING, "a member left")
        assert not g.serving and g.problem == "a member left"
        g.move(GroupState.CANNOT_PLACE, "too small")
        assert not g.state.building and g.problem == "too small"

    asyncio.run(main())


def test_model_dims_count_a_stage_from_the_checkpoint_and_refuse_a_config_without_sizes():
    from types import SimpleNamespace

    from master_core.model_dims import ModelDims

    cfg = SimpleNamespace(
        num_hidden_layers=3,
        hidden_size=64,
        vocab_size=384,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=None,
    )
    d = ModelDims.parse(cfg, ([10, 20, 30], 7, 5, [2, 4, 6]))
    assert (d.max_positions, d.kv_bytes_per_token) == (2048, 2 * 2 * 16 * 4)  # head_dim 64 / 4
    assert (d.stage_params(0, 1), d.stage_params(1, 2), d.stage_params(1, 3), d.stage_params(0, 3)) == (17, 20, 55, 72)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelDims.parse(SimpleNamespace(num_hidden_layers=3, vocab_size=9, num_attention_heads=2), ([1], 1, 1, [0]))


def test_ending_a_loop_that_swallowed_its_cancellation():
    # Python 3.11's wait_for can swallow a cancel; the worker's step loop then carried on forever
    import asyncio

    from worker_core.tasks import end_tasks

    async def main() -> tuple[int, bool]:
        swallowed = 0

        async def loop() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed += 1  # the first cancel is lost, as in the race

        t = asyncio.create_task(loop())
        await asyncio.sleep(0)
        await asyncio.wait_for(end_tasks([t], bound=5.0), 10)
        return swallowed, t.cancelled()

    assert asyncio.run(main()) == (1, True)


def test_a_stopped_worker_does_not_dial_again_when_a_tunnels_teardown_swallowed_the_stop(monkeypatch, tmp_path):
    # CI, a lab run: SIGTERM reached a worker as its tunnel closed; the tunnel's teardown lost the
    # cancel (3.11's wait_for) and the worker dialled the gone master until killed, its router's
    # pinhole left open.  A stopped worker now never dials again.
    import asyncio

    from worker_core import worker as W
    from worker_core.config import WorkerConfig

    async def main() -> int:
        dials = 0
        dialling = asyncio.Event()

        async def connect_once(*_: object) -> str:
            nonlocal dials
            dials += 1
            dialling.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if dials > 1:
                    raise
                return "closed by the master"  # the first cancel is lost, as in the race
            return "never"

        monkeypatch.setattr(W, "_connect_once", connect_once)
        config = WorkerConfig("127.0.0.1:1", device="cpu", retry_seconds=0.01, direct=False, weights_dir=tmp_path)
        t = asyncio.create_task(W.serve(config))
        await asyncio.wait_for(dialling.wait(), 30)
        t.cancel()
        await asyncio.wait([t], timeout=2.0)
        assert t.done(), f"the worker dialled {dials} times after its stop"
        return dials

    assert asyncio.run(main()) == 1


def test_a_cpu_stage_attends_with_grouped_heads_as_they_are_and_the_same_output(tmp_path, monkeypatch):
    """worker_core.shard.grouped_attention_on: a packed step of a grouped-query model (2 key/value
    heads for 4 query heads) on a CPU never copies the key/value heads per group (transformers'
    repeat_kv), and its output is the one the copying path gives."""
    import transformers.integrations.sdpa_attention as sdpa
    from tiny_models import make_tiny_checkpoint

    from worker_core.shard import FORCE_GQA, load_shard
    from worker_core.stage import StageRunner
    from worker_core.wire import Segment

    folder = make_tiny_checkpoint("llama", tmp_path / "llama", num_layers=3, seed=3)
    copies = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: copies.append(1) or real(*a))
    monkeypatch.delenv(FORCE_GQA, raising=False)
    shard = load_shard(folder, 0, 2, torch.device("cpu"), torch.float32)
    ids = torch.arange(3, 40)
    segments = (Segment(1, 0, 20, False), Segment(2, 0, 17, False))  # two requests packed: a mask
    grouped = StageRunner(shard, 1000, 256).run(segments, ids)
    assert not copies
    monkeypatch.setenv(FORCE_GQA, "0")  # transformers' own choice: with a mask, copy the heads
    copied = StageRunner(shard, 1000, 256).run(segments, ids)
    assert grouped.shape == (37, 64) and copies and torch.allclose(grouped, copied, atol=1e-5)


def test_a_cpu_stage_attends_each_segment_to_its_own_keys_with_the_packed_output(tmp_path, monkeypatch):
    """worker_core.segment_attention: a CPU stage's packed step (a decode row, a prompt chunk
    past cached positions, a fresh prompt; a sliding-window model among them) attends each
    segment's rows to its own request's keys only: no attention call sees more keys than its
    segment's positions, and the output is the packed block-diagonal attention's.  Layers that
    attend to the keys as cached take them unjoined (split); DeepSeek's, which expand cached
    latents first, are found out by the probe and cut along the packed layout instead."""
    import transformers.integrations.sdpa_attention as sdpa
    from tiny_models import make_tiny_checkpoint

    from worker_core import segment_attention
    from worker_core.shard import load_shard
    from worker_core.stage import StageRunner
    from worker_core.wire import Segment

    widest = []
    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(
        segment_attention,
        "sdpa_attention_forward",
        lambda m, q, k, *a, **kw: widest.append((q.shape[2], k.shape[2])) or real(m, q, k, *a, **kw),
    )
    # mistral: a sliding window of 32 (the chunk reaches past it)
    for family, split in (("llama", True), ("mistral", True), ("deepseek_v2", False)):
        folder = make_tiny_checkpoint(family, tmp_path / family, num_layers=3, seed=5)
        shard = load_shard(folder, 0, 2, torch.device("cpu"), torch.float32)
        assert shard.config._attn_implementation == segment_attention.SEGMENTS
        probed = StageRunner(shard, 10, 10)
        assert shard.keys_as_cached is split and len(probed.kv) == 0, family  # the probe wrote scratch buffers only
        outs, calls = {}, {}
        for impl in (segment_attention.SEGMENTS, "sdpa"):
            shard.config._attn_implementation = impl
            runner = StageRunner(shard, 4000, 512)
            runner.run((Segment(1, 0, 30, False), Segment(2, 0, 40, False)), torch.arange(3, 73))
            widest.clear()
            step = (Segment(1, 30, 1, True), Segment(2, 40, 24, False), Segment(3, 0, 11, False))
            outs[impl] = runner.run(step, torch.arange(5, 41))
            calls[impl] = sorted(set(widest))
        assert calls == {segment_attention.SEGMENTS: [(1, 31), (11, 11), (24, 64)], "sdpa": []}, calls
        assert torch.allclose(outs[segment_attention.SEGMENTS], outs["sdpa"], atol=1e-5), family


def test_a_cpu_stage_attends_a_chain_of_cached_prefixes_in_pieces_with_the_joined_output(tmp_path, monkeypatch):
    """worker_core.segment_attention: a request that starts from a chain of cached prefixes (a
    conversation's turns, each from the one before) attends to them piece by piece, merged by
    their log-sum-exp, never joined: a decode step and a chunk step of the third turn give the
    joined path's output (a sliding-window model among them: its window cuts into the pieces)."""
    from tiny_models import make_tiny_checkpoint

    from worker_core import segment_attention
    from worker_core.shard import load_shard
    from worker_core.stage import StageRunner
    from worker_core.wire import Segment

    pieces = []
    real = segment_attention._merged
    monkeypatch.setattr(segment_attention, "_merged", lambda q, ks, *a: pieces.append(len(ks)) or real(q, ks, *a))
    for family in ("llama", "mistral"):  # mistral: a window of 32, shorter than the history
        folder = make_tiny_checkpoint(family, tmp_path / family, num_layers=3, seed=9)
        shard = load_shard(folder, 0, 2, torch.device("cpu"), torch.float32)
        StageRunner(shard, 10, 10)
        outs = {}
        for impl in (segment_attention.SEGMENTS, "sdpa"):
            shard.config._attn_implementation = impl
            runner = StageRunner(shard, 4000, 512)
            runner.run((Segment(1, 0, 40, False),), torch.arange(3, 43))
            runner.run((Segment(2, 32, 20, False, base=1),), torch.arange(50, 70))  # [0, 32) of turn 1
            runner.run((Segment(3, 48, 10, False, base=2),), torch.arange(80, 90))  # [0, 48) of turn 2
            pieces.clear()
            decode = runner.run((Segment(3, 58, 1, True),), torch.tensor([91]))
            chunk = runner.run((Segment(3, 59, 6, False),), torch.arange(92, 98))
            outs[impl] = (decode, chunk, list(pieces))
        merged, joined = outs[segment_attention.SEGMENTS], outs["sdpa"]
        assert merged[2] == [3] * 4 and joined[2] == [], (family, merged[2])  # 3 pieces, 2 layers, 2 steps
        assert torch.allclose(merged[0], joined[0], atol=1e-5) and torch.allclose(merged[1], joined[1], atol=1e-5)
