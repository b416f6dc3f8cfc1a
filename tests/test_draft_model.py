"""Speculative decoding with a draft model (``--draft-model``, worker_core.draft_model): a tiny
same-family pair built here (the target: a 3-layer tiny llama whose last layer adds little; the
draft: the target without that layer, so it agrees often but not always).  The drafter on its
own (greedy drafts equal to the draft model's own greedy continuation, its cache cropped after a
rejection, freed, bounded); through a 3-stage group, greedy output is transformers' token for
token with the draft model's drafts accepted and rejected, seeded sampled output is the same with
and without drafting, and nothing (stage KV, draft caches) outlives the requests; a draft model
whose vocabulary differs is refused at start with a clear error."""

import asyncio
import gc
import json
import shutil
import time

import pytest
import torch
from harness import Cluster, greedy, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.config import MasterConfig
from master_core.request import SamplingParams
from master_core.server import Master, load_tokenizer
from master_core.speculation import PROBE_K, REPROBE, Speculator
from worker_core.draft_model import DraftModel, check_vocab, load_draft_model
from worker_core.kv_cache import KVStore

# a prompt without a repeated bigram: prompt lookup has nothing to draft at first
PROMPT = [(13 * i + 5) % 150 + 20 for i in range(30)]
LAST_LAYER_SCALE = 0.5  # the target's last layer, weakened: the draft agrees with it about 40% of the time


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target folder, draft folder): the draft is the target less its last decoder layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("draftpair")
    target = make_tiny_checkpoint(
        "llama", root / "target", num_layers=3, seed=4, tie_embeddings=True, config={"initializer_range": 0.12}
    )
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    last = model.model.layers[2]
    with torch.no_grad():
        last.self_attn.o_proj.weight.mul_(LAST_LAYER_SCALE)
        last.mlp.down_proj.weight.mul_(LAST_LAYER_SCALE)
    model.save_pretrained(target)
    cfg = AutoConfig.from_pretrained(target)
    cfg.num_hidden_layers = 2
    small = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = small.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".layers.2." not in k}, strict=False
    )
    assert not missing and not unexpected
    draft = root / "draft"
    small.save_pretrained(draft)
    for f in target.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, draft / f.name)
    return target, draft


def _drafter(pair, sessions: int = 4) -> DraftModel:
    target, draft = pair
    tok = load_tokenizer(target)
    return load_draft_model(str(draft), tok, len(tok), sessions)


def test_the_drafter_drafts_its_models_greedy_continuation_crops_frees_and_is_bounded(pair):
    _, draft = pair
    d = _drafter(pair, sessions=2)

    async def main():
        want = reference_greedy(draft, PROMPT, 12)
        first = (await d.propose([(1, PROMPT, 4)]))[0]
        passes = d.forward_passes
        # two drafts accepted, then a correction (not what the draft model said): its cache is cut
        # back to the accepted ones and it drafts on from the correction
        wrong = (want[2] + 1) % 300
        tokens = [*PROMPT, *want[:2], wrong]
        again = (await d.propose([(1, tokens, 3)]))[0]
        fed_once = d.forward_passes - passes  # one pass for the correction, then one per draft but the last
        all_kept = (await d.propose([(2, [*PROMPT, *want[:4]], 4)]))[0]
        held = d.held()
        for key in (3, 4, 5):  # more requests than it keeps: the least recently used go
            await d.propose([(key, PROMPT[:10], 1)])
        bounded = d.held()
        d.free(4)
        d.free(5)
        d.free(99)  # never seen: nothing happens
        d.max_tokens = len(PROMPT) + 5  # and no more cached tokens than that in all
        await d.propose([(6, PROMPT, 2)])
        await d.propose([(7, PROMPT, 2)])
        by_tokens = d.held()
        d.free(7)
        return want, first, tokens, again, fed_once, all_kept, held, bounded, by_tokens, d.held()

    want, first, tokens, again, fed_once, all_kept, held, bounded, by_tokens, left = run(main())
    d.close()
    assert first == tuple(want[:4])
    assert again == tuple(reference_greedy(draft, tokens, 3))
    assert fed_once == 3  # not the whole prompt again
    assert all_kept == tuple(want[4:8])
    assert held == 2 and bounded == 2 and by_tokens == 1 and left == 0
    assert d.token_seconds > 0  # measured: adaptive k counts the model's time


def test_a_draft_model_with_another_vocabulary_is_refused_at_start(pair, tmp_path):
    target, draft = pair
    other = tmp_path / "other"
    shutil.copytree(draft, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]  # two tokens swap their ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))

    async def start(path: str) -> str:
        m = Master(MasterConfig(model=str(target), port=0, speculative=True, draft_model=path))
        with pytest.raises(ValueError) as e:
            await m.start()  # refused before anything listens or runs: nothing to stop
        return str(e.value)

    why = run(start(str(other)))
    assert "vocabulary differs from the served model's" in why and str(other) in why
    assert "not a local model folder" in run(start(str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="vocab_size 10"):
        check_vocab({"a": 0, "b": 11}, {"a": 0, "b": 11}, 10, "x")


def _stores() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, KVStore)]


def _draft_models() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, DraftModel)]


@pytest.mark.parametrize("in_loop", [True, False], ids=["last-stage-drafts", "master-drafts"])
def test_a_group_with_a_draft_model_is_greedy_identical_accepts_drafts_and_frees_everything(pair, in_loop):
    """With the loop-back drafting (every hop direct) the last stage holds the draft model too
    and drafts with it inside the loop; with it off (or relayed hops) the master drafts."""
    target, draft = pair
    new = 32
    seeded = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)

    async def main():
        old = {id(s) for s in _stores()}
        old_drafters = {id(d) for d in _draft_models()}
        async with Cluster(target, workers=3, draft_model=str(draft)) as c:
            mine = [s for s in _stores() if id(s) not in old]
            e = c.engine
            e.loop_drafts = in_loop
            assert e.speculative and e.drafter is not None  # --draft-model implies speculation
            stage_drafters = [d for d in _draft_models() if d is not e.drafter and id(d) not in old_drafters]
            assert len(stage_drafters) == 1  # the last stage's copy (in this process: the workers' too)
            ready = c.master.group.stages[-1].ready
            assert ready is not None and ready.draft_seconds > 0
            got = await e.generate(PROMPT, greedy(new))
            counts = (e.model_draft_trips, e.model_drafted_tokens, e.model_accepted_tokens, e.loop_draft_trips)
            measured = c.master.group.stages[-1].draft_seconds  # its running measure, from its results
            assert (measured > 0) == in_loop, measured
            from prometheus_client import generate_latest

            scraped = generate_latest(c.master.metrics.registry).decode()
            assert f"molink_model_accepted_draft_tokens_total {float(counts[2])}" in scraped
            batch = await asyncio.gather(*(e.generate(PROMPT[i:], greedy(new)) for i in range(1, 3)))
            on = await e.generate(PROMPT, seeded)
            e.speculative = False
            off = await e.generate(PROMPT, seeded)
            e.speculative = True
            # a request cancelled while the draft model works for it: its step does not go, its
            # caches (stages and draft models) are freed all the same
            d = stage_drafters[0] if in_loop else e.drafter
            take = d._take

            def slowly(key):  # on the drafting thread: the request's session is taken (busy) for 0.4 s
                session = take(key)
                time.sleep(0.4)
                return session

            d._take = slowly
            req = e.submit(PROMPT, greedy(new))
            for _ in range(200):
                if d._busy:
                    break
                await asyncio.sleep(0.01)
            busy = bool(d._busy)
            e.cancel(req)
            await asyncio.sleep(0.6)
            d._take = take
            for _ in range(500):  # in the loop-back its lane ends once the step in flight is back
                if not req.in_flight:
                    break
                await asyncio.sleep(0.01)
            held = e.held()
            replays = e.replays
            e.kv.forget_idle()
            await asyncio.sleep(0.3)  # Free crosses the tunnels
            caches = stage_drafters[0].held()
            return got, counts, batch, on, off, held, replays, sum(len(s) for s in mine), busy, caches

    got, counts, batch, on, off, held, replays, left, busy, stage_caches = run(main())
    trips, drafted, accepted, in_loop_trips = counts
    assert busy  # the cancel came while it drafted
    assert len(got[0]) == new and got[0] == reference_greedy(target, PROMPT, new)
    assert trips > 0 and 0 < accepted < drafted, counts  # accepted and rejected ones
    if in_loop:  # the model's drafts came from inside the loop-back, not from the master
        assert in_loop_trips >= trips, counts
    else:
        assert in_loop_trips == 0, counts
    for i, (tokens, _, _) in enumerate(batch, start=1):
        assert tokens == reference_greedy(target, PROMPT[i:], new)
    assert on[0] == off[0]  # seeded sampling: the same tokens with and without drafting
    assert replays == 0
    assert held == {"running": 0, "waiting": 0, "text_streams": 0, "draft_caches": 0}
    assert left == 0  # every stage freed every request's cache, rejected drafts included
    assert stage_caches == 0  # and the last stage's draft model every request's


def test_the_bench_builds_a_first_layers_draft_and_prints_its_table(pair, tmp_path):
    from app.tools.bench.options import BenchOptions
    from app.tools.bench.speculative import draft_folder, draft_table

    target, _ = pair
    opts = BenchOptions(model=str(target), draft_model="first:2", out=tmp_path)
    folder = draft_folder(opts)
    tok = load_tokenizer(target)
    d = load_draft_model(folder, tok, len(tok), 1)  # the same vocabulary: accepted
    assert len(d.model.model.layers) == 2
    d.close()
    assert draft_folder(BenchOptions(model=str(target), draft_model="self")) == str(target)
    with pytest.raises(ValueError, match="has 3 layers"):
        draft_folder(BenchOptions(model=str(target), draft_model="first:3", out=tmp_path / "x"))
    mode = {"decode_tokens_per_s": 2.0, "tokens_per_trip": 3.0, "draft_trips": 5, "model_draft_trips": 4}
    mode |= {"model_drafts_per_trip": 6.0, "model_accepted_per_trip": 2.5, "draft_seconds": 1.0, "decode_seconds": 9}
    row = {
        "profile": "wan",
        "draft_model": "first:2",
        "tasks": {
            "copy": {
                "kind": "grounded",
                "modes": {"off": {"decode_tokens_per_s": 1.0}, "draft": mode, "draft-master": mode},
                "draft_speedup": 2.0,
                "draft-master_speedup": 2.0,
                "tokens_identical": True,
            }
        },
    }
    table = draft_table([row])
    assert (
        "| wan | first:2 | copy (grounded) | last stage | 1.0 | 2.0 | 2.00x | 3.00 | 4 | 6.00 | 2.50 | 1 | n/a / 9.0 "
        "| True |" in table
    )
    assert (
        "| wan | first:2 | copy (grounded) | master | 1.0 | 2.0 | 2.00x | 3.00 | 4 | 6.00 | 2.50 | 1 | 1.0 / 9.0 "
        "| True |" in table
    )
    assert draft_table([{"profile": "wan", "draft_model": "", "tasks": {}}]) == ""


def test_k_counts_the_draft_models_time():
    """The engine adds the draft model's time per drafted token to a trip's (Engine._verify):
    where drafting costs more than the trips it saves, drafting switches itself off."""
    from master_core.speculation import choose_k

    wan = lambda n: 0.1 + 0.001 * n  # noqa: E731  a trip: links, hardly any compute
    assert choose_k(0.5, wan) > 0
    assert choose_k(0.5, lambda n: wan(n) + (n - 1) * 0.002) > 0  # a cheap draft model still pays
    assert choose_k(0.5, lambda n: wan(n) + (n - 1) * 0.2) == 0  # one costing two trips a token does not
    s = Speculator()
    s.observe(4, 4, wan, draft_cost=0.2)  # all accepted, but each cost two trips
    assert s.model_k == 0 and s.k > 0  # the model is off; prompt lookup (free) still drafts
    assert [s.model_budget() for _ in range(REPROBE)][-1] == PROBE_K  # and the model is probed again later
    s.observe(2, 2, wan, draft_cost=0.0005)
    assert s.model_k > 0


def test_a_paired_groups_last_stage_gets_the_draft_model_from_the_master_and_drafts_with_it(pair, tmp_path):
    """In a paired group the members read no model folder: the last stage's Assign names the
    draft model's config and tensors, which it fetches from the master by hash like its range's,
    then drafts with it inside the loop-back; its memory is taken from that stage's KV budget."""
    from harness import paired_group

    target, draft = pair
    new = 24

    async def main():
        async with paired_group(target, tmp_path, draft_model=str(draft)) as master:
            g, e = master.group, master.engine
            last = g.stages[-1]
            asg = last.assignment
            first_asg = g.stages[0].assignment
            got = await e.generate(PROMPT, greedy(new))
            cached = " ".join(f.name for f in (tmp_path / last.name / "weights").rglob("*.safetensors"))
            return asg, first_asg, last.ready, got, (e.model_draft_trips, e.loop_draft_trips), g.draft, cached

    asg, first_asg, ready, got, (model_trips, loop_trips), offer, cached = run(main(), 240)
    assert asg is not None and first_asg is not None and ready is not None and offer is not None
    assert asg.draft_model == offer.model and asg.draft_manifest and not first_asg.draft_model
    assert {s.name for s in asg.draft_manifest} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert ready.draft_seconds > 0  # loaded from what the master delivered
    assert all(s.sha256 in cached for s in asg.draft_manifest)  # its tensors, in the member's store
    assert got[0] == reference_greedy(target, PROMPT, new)
    assert model_trips > 0 and loop_trips >= model_trips


def test_a_last_stages_drafts_lookup_first_then_its_model_measured_and_freed(pair):
    """worker_core.drafting.LoopDrafts: prompt lookup drafts where the history repeats itself; the
    draft model (loaded once per key, its warm-up measured) only where lookup found nothing and
    its budget allows, its drafts marked as its own and equal to its greedy continuation; the
    cost of a drafted token becomes the wall time waited per token; free forgets both sides;
    a load that fails holds no model and drafts by lookup only."""
    from worker_core.draft_model import open_draft_model
    from worker_core.drafting import LoopDrafts

    _, draft = pair
    repeated = [*PROMPT[:10], *PROMPT[:6]]  # its last 3 tokens occurred before: lookup drafts

    async def main():
        d = LoopDrafts()
        loads = 0

        async def load() -> DraftModel:
            nonlocal loads
            loads += 1
            return await asyncio.to_thread(open_draft_model, draft, 384, 4)

        warm = await d.hold("a", load)
        again = await d.hold("a", load)  # the same key: kept, not loaded again
        before = d.token_seconds
        d.histories.start(1, PROMPT)
        d.histories.start(2, repeated)
        made = await d.draft([(1, 4, 3), (2, 4, 3), (3, 4, 3)])  # 3: no history held
        none_by_model = await d.draft([(1, 4, 0)])
        waited = d.token_seconds
        held = d.model.held() if d.model else -1
        d.free([1, 2])
        after_free = (d.model.held() if d.model else -1, d.histories.tokens(1))

        async def broken() -> DraftModel:
            raise OSError("no such folder")

        failed = await d.hold("b", broken)
        d.histories.start(5, [*repeated, 99])  # no earlier occurrence of its tail: nothing without a model
        d.histories.start(6, repeated)
        by_lookup = await d.draft([(5, 4, 3), (6, 4, 3)])
        d.close()
        return warm, again, loads, before, made, none_by_model, waited, held, after_free, failed, d.model, by_lookup

    warm, again, loads, before, made, none_by_model, waited, held, after_free, failed, model, by_lookup = run(main())
    assert warm > 0 and again == warm and loads == 1 and before == warm
    (m1, by1), (m2, by2), (m3, by3) = made
    assert by1 and m1 == tuple(reference_greedy(draft, PROMPT, 3))  # the model's, for what lookup misses
    assert not by2 and m2 == tuple(PROMPT[6:10])  # lookup's: what followed the earlier occurrence
    assert m3 == () and not by3
    assert none_by_model == [((), False)]  # no model budget: nothing
    assert waited > 0 and held == 1
    assert after_free == (0, [])
    assert failed == 0.0 and model is None  # a failed load holds none (the old one was dropped)
    assert by_lookup == [((), False), (tuple(PROMPT[6:10]), False)]  # and lookup drafts on


def test_the_last_stage_holds_the_draft_model_out_of_its_kv_budget_unless_that_would_halve_it(pair):
    """Group.assignment: only the range ending at the last layer names the draft model; its
    float32 bytes come out of that stage's memory before its KV budget is set, and a stage whose
    budget that would halve (or worse) gets no draft model (drafts are optional, KV is not)."""
    from types import SimpleNamespace

    from master_core.draft_offer import DraftOffer, offer_draft
    from master_core.group import Group
    from master_core.model_dims import ModelDims
    from worker_core.wire import Hello

    target, draft = pair
    dims = ModelDims.load(target)
    offer = offer_draft(draft, None)
    assert offer.model == str(draft.resolve()) and offer.nbytes > 0
    g = Group(MasterConfig(model=str(target), max_kv_tokens=1 << 20), str(target), dims)
    n = dims.num_layers

    def assign(free: int, a: int, b: int, with_offer: DraftOffer | None = offer):
        g.draft = with_offer
        link = SimpleNamespace(name="w", hello=Hello("w", "cpu", "cpu", free, free, "float32"))
        return run(g.assignment(link, a, b, 1))  # type: ignore[arg-type]

    roomy = 200 * offer.nbytes
    plain, first, last = assign(roomy, n - 1, n, None), assign(roomy, 0, n - 1), assign(roomy, n - 1, n)
    assert not first.draft_model and first.kv_tokens == assign(roomy, 0, n - 1, None).kv_tokens
    assert last.draft_model == offer.model and 0 < plain.kv_tokens - last.kv_tokens < plain.kv_tokens // 2
    from worker_core.precision import Precision

    weights = dims.stage_bytes(n - 1, n, Precision.NONE, 4)
    snug = weights + 3 * offer.nbytes  # the draft takes a third of what is left for KV: held
    tight = weights + offer.nbytes * 3 // 2  # two thirds: not held
    assert assign(snug, n - 1, n).draft_model == offer.model
    assert not assign(tight, n - 1, n).draft_model
    assert assign(tight, n - 1, n).kv_tokens == assign(tight, n - 1, n, None).kv_tokens
