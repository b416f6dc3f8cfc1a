"""Speculative decoding with prompt lookup (master_core.speculation, its use in the engine, the
``Segment.rows`` wire field): drafting, k adaptation and verification on their own; the sampled
distribution stays the model's (a chi-square test); and through a real group, greedy output is
transformers' token for token with drafts accepted, seeded sampled output (penalties
included) is the same with and without speculation, stop strings and ``max_tokens`` hold
mid-draft, and no KV cache outlives the requests."""

import asyncio
import gc
import math

import pytest
import torch
from harness import Cluster, greedy, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.request import SamplingParams
from master_core.sampling import sample
from master_core.scheduler import Chunk
from master_core.speculation import (
    K_MAX,
    PROBE_K,
    REPROBE,
    Speculator,
    choose_k,
    plan_drafts,
    verify,
)
from worker_core.kv_cache import KVStore
from worker_core.lookup import PromptLookup
from worker_core.sampling import token_generator
from worker_core.wire import ProtocolError, Segment, Step, decode, encode

# a prompt that repeats itself: the kind of text prompt lookup drafts well (copy, edit)
PASSAGE = [(7 * i + 3) % 97 + 20 for i in range(24)]
COPY = [*PASSAGE, 5, 6, *PASSAGE, 5, 6, *PASSAGE[:6]]


# --------------------------------------------------------------------------- drafting


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lk = PromptLookup()
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # the trigram 1 2 3 occurred at the start: what followed it
    assert lk.draft(tokens, 3) == (4, 5, 9)
    # the bigram 2 3 occurred last before 7 (the trigram 9 2 3 only once before: no match for it)
    assert lk.draft([*tokens, 6, 9, 2, 3], 2) == (7, 8)
    assert lk.draft([*tokens, 6, 9, 2, 3, 11], 4) == ()  # "3 11" never occurred before
    assert lk.draft([1, 2, 1, 2], 8) == (1, 2)  # only as many as there are
    assert lk.draft([1, 2, 1, 2], 0) == ()


def test_k_follows_acceptance_and_the_cost_of_a_trip():
    flat = lambda n: 1.0  # noqa: E731  a trip costs the same for any number of tokens (a WAN)
    steep = lambda n: float(n)  # noqa: E731  every token costs a full trip (compute bound)
    assert choose_k(0.9, flat) == K_MAX
    assert choose_k(0.05, flat) >= 1  # free drafts always pay a little
    assert choose_k(0.9, steep) == 0 and choose_k(0.99, steep) == 0
    mid = lambda n: 1.0 + 0.1 * n  # noqa: E731
    assert choose_k(0.9, mid) > choose_k(0.3, mid)
    s = Speculator()
    costly = lambda n: 1.0 + 0.3 * n  # noqa: E731  each token adds 30% of a trip (compute on a fast link)
    for _ in range(6):  # every draft rejected, where drafts cost
        s.observe(s.k or 1, 0, costly)
    assert s.k == 0
    assert [s.budget() for _ in range(REPROBE)][-1] == PROBE_K  # a re-probe after REPROBE steps
    for _ in range(6):  # now they are all accepted
        s.observe(s.k or PROBE_K, s.k or PROBE_K, costly)
    assert s.k >= 2  # back on


class _Req:
    """What plan_drafts reads of a request."""

    def __init__(self, tokens: list[int], prompt: int, max_tokens: int) -> None:
        self.tokens = tokens
        self.prompt = tokens[:prompt]
        self.params = SamplingParams(max_tokens=max_tokens)
        self.constraint = None
        self.spec = Speculator()

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]


def test_drafts_stay_within_max_tokens_context_step_and_kv():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    r = _Req(list(tokens), 10, 4)  # two tokens out, two to go: one draft and the bonus
    c = Chunk(1, len(tokens) - 1, 1, True)
    out, added = plan_drafts([c], [r], 100, 100, 512)
    assert out == [Chunk(1, len(tokens) - 1, 2, True, rows=2)] and added == 1 and r.spec.pending == (4,)
    r = _Req(list(tokens), 5, 100)
    assert plan_drafts([c], [r], 100, 100, 512)[0][0].rows == 5  # k starts at 4
    assert plan_drafts([c], [r], 2, 100, 512)[0][0].rows == 3  # the step's token budget
    assert plan_drafts([c], [r], 100, 1, 512)[0][0].rows == 2  # the KV room
    assert plan_drafts([c], [r], 100, 100, len(tokens) + 3)[0][0].rows == 3  # the context
    r.constraint = object()  # a grammar's state would have to follow every draft: no drafts
    assert plan_drafts([c], [r], 100, 100, 512) == ([c], 0)
    r.constraint = None
    prefill = Chunk(1, 0, len(tokens), True)  # a prefill carries no drafts
    assert plan_drafts([prefill], [r], 100, 100, 512) == ([prefill], 0) and r.spec.pending == ()


# --------------------------------------------------------------------------- verification


def test_verify_keeps_the_matching_drafts_then_one_more_token():
    def take_from(tokens):
        return lambda j: tokens[j]

    assert verify((4, 5, 6), take_from([4, 5, 6, 7])) == 3  # all accepted, and the bonus
    assert verify((4, 5, 6), take_from([4, 9, 6, 7])) == 1  # the correction 9 ends it
    assert verify((4, 5, 6), take_from([8, 5, 6, 7])) == 0
    taken = []
    assert verify((4, 5), lambda j: taken.append(j) or None) == 0 and taken == [0]  # the request ended


def _probs(values: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampler's distribution over candidates (as worker_core.sampling.draw builds it)."""
    p = torch.softmax(values.double() / temperature, dim=-1)
    sorted_p, order = torch.sort(p, descending=True)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
    q = torch.zeros_like(p)
    q[order[keep]] = p[order[keep]]
    return q / q.sum()


def test_the_sampled_distribution_is_the_models_with_drafts():
    """Many seeded requests each verify the same draft against the same rows: the first token
    they keep follows the sampler's distribution (chi-square), the draft is kept with its
    probability, and after a kept draft the next token follows the next row's distribution."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(2, 12, generator=g) * 1.5  # two rows of candidate logits
    ids = torch.arange(100, 112)
    params = SamplingParams(temperature=0.8, top_p=0.95, presence_penalty=0.3)
    previous = [103, 107]  # penalties apply to the output so far, as in a plain step
    draft = 100 + int(torch.argsort(values[0], descending=True)[1])  # the second most likely token
    n = 6000
    first = torch.zeros(12)
    second = torch.zeros(12)
    for seed in range(n):
        out: list[int] = []

        def take(j: int, seed: int = seed, out: list[int] = out) -> int:
            s = sample(values[j], ids, 0.0, params, token_generator(seed, 50 + j), previous + out)
            out.append(s.token_id)
            return s.token_id

        accepted = verify((draft,), take)
        first[out[0] - 100] += 1
        if accepted:
            second[out[1] - 100] += 1
        # the same seed without drafts draws the same first token: identical, not just alike
        plain = sample(values[0], ids, 0.0, params, token_generator(seed, 50), previous)
        assert plain.token_id == out[0]
    penalty = torch.tensor([0.3 if 100 + i in previous else 0.0 for i in range(12)])
    p1 = _probs(values[0] - penalty, 0.8, 0.95)
    p2 = _probs(values[1] - penalty - 0.3 * (torch.arange(12) == draft - 100).double(), 0.8, 0.95)
    for counts, p in ((first, p1), (second, p2)):
        total = counts.sum()
        expected = p * total
        mask = expected > 5
        chi2 = float((((counts.double() - expected) ** 2 / expected)[mask]).sum())
        df = int(mask.sum()) - 1
        p_value = float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(chi2 / 2.0)))
        assert p_value > 1e-3, (chi2, df, p_value)
        assert counts[~mask].sum() <= max(10.0, 3 * float(expected[~mask].sum()))
    kept = float(second.sum()) / n
    assert abs(kept - float(p1[draft - 100])) < 4 * math.sqrt(p1[draft - 100] * (1 - p1[draft - 100]) / n)


# --------------------------------------------------------------------------- the wire


def test_a_bad_rows_field_is_refused_with_a_clear_error():
    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    good = Step(1, 1, (Segment(7, 4, 3, True, rows=3),), ids)
    assert decode(encode(good)) == good
    for seg, why in (
        (Segment(7, 4, 3, True, rows=4), "rows"),
        (Segment(7, 4, 3, True, rows=0), "rows"),
        (Segment(7, 4, 3, False, rows=2), "want_logits"),
    ):
        with pytest.raises(ProtocolError, match=why):
            decode(encode(Step(1, 1, (seg,), ids)))
    with pytest.raises(ProtocolError, match="one row"):  # a looping step draws one token per segment
        from worker_core.wire import Draw

        decode(encode(Step(1, 1, (Segment(7, 4, 3, True, rows=2),), ids, loop=2, draws=(Draw(0.0, 1.0, 1),))))


# --------------------------------------------------------------------------- a group


# tied embeddings and larger weights: a random model whose greedy output falls into short repeats
# now and then (so drafts are accepted, and rejected where a repeat ends); untied random models
# almost never repeat, so no draft of theirs would ever be accepted
REPEATS = {"tie_embeddings": True, "config": {"initializer_range": 0.12}}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("spec") / "llama", num_layers=2, seed=4, **REPEATS)


async def _generate(c: Cluster, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
    return await c.engine.generate(prompt, params)


def _stores() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, KVStore)]


@pytest.mark.parametrize("loop_back", [True, False], ids=["drafts-in-the-loop-back", "drafts-on-the-master"])
def test_a_group_speculates_greedy_identical_sampled_identical_stops_hold_and_frees_everything(llama, loop_back):
    """Where the pipeline loops back the last stage drafts (prompt lookup over the tokens the
    master sent and those it drew) and feeds the drafts straight back; else the master drafts
    and verifies every step.  Either way: greedy tokens are transformers', seeded sampled ones
    those without speculation, max_tokens and stop strings hold, every cache is freed."""
    new = 40
    want = reference_greedy(llama, COPY, new)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True, presence_penalty=0.4)
    loose = SamplingParams(max_tokens=24, temperature=1.1, seed=8, ignore_eos=True)

    async def main():
        old = {id(s) for s in _stores()}
        async with Cluster(llama, workers=2, speculative=True) as c:
            mine = [s for s in _stores() if id(s) not in old]
            e = c.engine
            e.loop_back = loop_back
            got = await _generate(c, COPY, greedy(new))
            accepted, trips = e.accepted_tokens, e.draft_trips
            batch = await asyncio.gather(*(_generate(c, COPY[i:], greedy(new)) for i in range(3)))
            on = [await _generate(c, COPY, p) for p in (seeded, loose)]
            short = await _generate(c, COPY, greedy(7))  # max_tokens falls inside a draft
            text = got[1]
            stop = text[len(text) // 2 : len(text) // 2 + 3]
            stopped = await _generate(c, COPY, greedy(new, stop=(stop,)))
            looped_on, in_loop = e.looped_steps, e.loop_draft_trips
            rolled_back = e.drafted_tokens > e.accepted_tokens
            from prometheus_client import generate_latest

            scraped = generate_latest(c.master.metrics.registry).decode()
            assert f"molink_loop_draft_trips_total {float(in_loop)}" in scraped
            assert f"molink_draft_trips_total {float(e.draft_trips)}" in scraped
            e.speculative = False
            trips_on = e.draft_trips
            off = [await _generate(c, COPY, p) for p in (seeded, loose)]
            stopped_off = await _generate(c, COPY, greedy(new, stop=(stop,)))
            e.speculative = True
            held = e.held()
            assert e.replays == 0  # no step was refused by a stage (positions, generations, KV budget)
            if loop_back:  # the last stage drafted: drafts crossed no master on their way
                assert looped_on > 0 and in_loop > 0, (looped_on, in_loop)
            else:
                assert looped_on == 0 and in_loop == 0
            e.kv.forget_idle()
            await asyncio.sleep(0.3)  # Free crosses the tunnels
            left = sum(len(s) for s in mine)
            # some were rejected (over all the answers: sampled ones too): the stages rolled back
            assert rolled_back, (e.drafted_tokens, e.accepted_tokens)
            return got, accepted, trips, batch, on, short, stopped, stop, off, stopped_off, held, left, trips_on, e

    got, accepted, trips, batch, on, short, stopped, stop, off, stopped_off, held, left, trips_on, e = run(main())
    assert got[0] == want
    assert trips > 0 and accepted > 0, (trips, accepted)  # drafts went and were accepted: the test can fail
    for i, (tokens, _, _) in enumerate(batch):
        assert tokens == reference_greedy(llama, COPY[i:], new)
    assert [t for t, _, _ in on] == [t for t, _, _ in off]  # seeded sampling: the same tokens
    assert short[0] == want[:7] and short[2] == "length"
    assert stop in got[1] and stopped[2] == "stop" and stop not in stopped[1]
    assert stopped[:2] == stopped_off[:2] and stopped[1] == got[1][: got[1].index(stop)]
    assert e.draft_trips == trips_on  # off means off
    assert held == {"running": 0, "waiting": 0, "text_streams": 0}
    assert left == 0  # every stage freed every request's cache, rejected drafts included


@pytest.mark.parametrize("arch,seed", [("qwen2", 4), ("mistral", 6), ("mixtral", 6)])
def test_other_families_speculate_token_identical(tmp_path, arch, seed):
    """A plain family, one with a 32-token sliding window (the copy prompt is longer), an MoE
    (seeds whose greedy output repeats somewhere)."""
    path = make_tiny_checkpoint(arch, tmp_path / arch, num_layers=2, seed=seed, **REPEATS)
    new = 24

    async def main():
        async with Cluster(path, workers=2, speculative=True) as c:
            got = await _generate(c, COPY, greedy(new))
            return got[0], c.engine.accepted_tokens

    tokens, accepted = run(main())
    assert tokens == reference_greedy(path, COPY, new)
    assert accepted > 0


def test_drafts_fit_a_tight_kv_budget_rejected_ones_counted(llama):
    """Three copy requests at once through a KV budget that does not hold them all (preemption,
    drafts limited by the room left): no stage ever refuses a step (a refusal would replay the
    request) and every answer is still transformers'."""
    new = 40
    prompts = [COPY[i:] for i in range(3)]

    async def main():
        async with Cluster(llama, workers=2, speculative=True, max_kv_tokens=200) as c:
            got = await asyncio.gather(*(_generate(c, p, greedy(new)) for p in prompts))
            return [t for t, _, _ in got], c.engine.replays, c.engine.accepted_tokens, c.engine.preemptions

    got, replays, accepted, preemptions = run(main())
    for prompt, tokens in zip(prompts, got):
        assert tokens == reference_greedy(llama, prompt, new)
    assert replays == 0 and accepted > 0
    assert preemptions > 0, "the test needs a budget that does not hold them all"


def test_rejected_drafts_kv_is_counted_until_the_next_step_overwrites_it():
    from master_core.kv_ledger import own
    from master_core.request import Request

    r = Request(1, prompt=list(range(10)), params=SamplingParams(max_tokens=20))
    r.tokens += [5, 6]  # 12 tokens; its last step wrote positions up to 16 (drafts), 2 of them accepted
    r.computed = r.scheduled = 11
    r.written = 16
    assert own(r) == 16  # the stages hold 16 positions until the next step truncates them
    r.written = 12  # that step started at 11 and wrote one token
    assert own(r) == 12


def test_a_fed_back_step_continues_each_segment_after_its_last_accepted_draft():
    """The master reads a fed-back step's chunks from the result before it: each row's drawn
    token, the drafts that step carried and the ones the last stage sent on."""
    import torch

    from master_core.journey import Journey
    from master_core.loop_drafts import fed_back
    from master_core.request import Request
    from master_core.scheduler import Chunk

    reqs = [Request(i, prompt=[1, 2, 3], params=SamplingParams(max_tokens=20)) for i in (1, 2)]
    for r in reqs:
        r.spec = Speculator()
    # request 1 carried drafts (7, 8, 9) after its token at 10; request 2 none, at 20
    chunks = [Chunk(1, 10, 4, True, 4), Chunk(2, 20, 1, True)]
    carried = [(7, 8, 9), ()]
    went = Journey(torch.zeros(5, 3), (7, 8, 5, 6, 4), [], 1, drafts=((11, 12), ()))
    out, drafts = fed_back(chunks, carried, went, reqs, [True, True])
    # 7 and 8 accepted, 5 drawn instead of 9: request 1 goes on at 13 with (5, 11, 12)
    assert out == [Chunk(1, 13, 3, True, 3), Chunk(2, 21, 1, True)]
    assert drafts == [(11, 12), ()]
    assert reqs[0].spec.pending == (11, 12) and reqs[0].spec.in_loop and reqs[0].scheduled == 16
    # a result naming no tokens (the last stage could not loop back): no draft is read as taken
    out, _ = fed_back(chunks, carried, Journey(torch.zeros(5, 3), (), [], 1), reqs, [False, False])
    assert out[0].start == 11


def test_a_loops_first_step_carries_a_bounded_history_that_fits_its_header():
    """The last stage drafts from the tokens the loop's first step carries: the last of each
    request's tokens, ``HISTORY_TOKENS`` shared by the micro-batch, so that even a micro-batch
    of long conversations makes a step the wire accepts (its header is bounded)."""
    import torch

    from master_core.loop_drafts import HISTORY_TOKENS, loop_draw
    from master_core.request import Request
    from master_core.scheduler import Chunk
    from worker_core.wire import MAX_TOKEN_ID

    reqs = [Request(i, prompt=[MAX_TOKEN_ID] * 20_000, params=SamplingParams(max_tokens=64)) for i in range(8)]
    for r in reqs:
        r.spec = Speculator()
        r.tokens[-1] = 7  # the last token is the newest
    share = HISTORY_TOKENS // len(reqs)
    draws = tuple(loop_draw(r, Chunk(r.id, 19_999, 1, True), 4, 32_768, share) for r in reqs)
    assert all(len(d.history) == share and d.history[-1] == 7 and d.k == 4 and d.left == 64 for d in draws)
    segments = tuple(Segment(r.id, 19_999, 1, True) for r in reqs)
    step = Step(3, 1, segments, torch.zeros(8, dtype=torch.int64), loop=8, draws=draws)
    assert decode(encode(step)).draws == draws  # within the header's bound, every token kept
    assert loop_draw(reqs[0], Chunk(0, 19_999, 1, True), 0, 32_768, share).history == ()  # no drafts: no history


def test_a_last_stage_keeps_the_histories_it_drafts_from_within_a_bound():
    from worker_core.lookup import Histories

    h = Histories(limit=2)
    h.start(1, [5, 6, 7, 9, 5, 6])
    assert h.draft(1, 3) == (7, 9, 5)  # what followed the latest earlier "5 6"
    h.extend(1, [7, 9])  # drawn since: the tail "6 7 9" occurred before, followed by "5 6 7"
    assert h.draft(1, 3) == (5, 6, 7)
    h.start(2, [1, 2])
    h.start(3, [1, 2])  # a third: the oldest (1) is forgotten
    assert len(h) == 2 and h.draft(1, 3) == () and h.draft(9, 3) == ()
    h.forget([2, 3])
    assert len(h) == 0
