"""Prefix caching across stages (master_core.prefix_cache, the engine's use of it): the block
table itself, and conversations whose later turns reuse the cached history give exactly the
tokens transformers gives for the whole prompt, under eviction pressure and across a re-plan;
the API reports the reused tokens.  Every family's cached history is checked in
test_architectures (on the same three-stage group as its other checks)."""

import asyncio
import json

import aiohttp
import pytest
from harness import Cluster, chat, conversation, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.prefix_cache import PrefixCache
from worker_core.kv_cache import KVStore, PackedCache, PackedSegment

NEW = 8
BUDGET = 240  # KV tokens per stage in the eviction test: about three conversations' worth


# --------------------------------------------------------------------------- the table


def test_lookup_finds_the_longest_cached_run_of_whole_blocks_and_leaves_the_last_token():
    c = PrefixCache("m", block=4)
    a = c.retain(1, list(range(10)), held=10, base=None, base_len=0)  # blocks [0,4) [4,8)
    assert a is not None and c.held_tokens == 10
    hit = c.lookup([*range(10), 99])
    assert hit is not None and hit.entry is a and hit.length == 8
    hit = c.lookup(list(range(8)))  # 8 tokens: the last one is computed, so one block
    assert hit is not None and hit.length == 4
    assert c.lookup([0, 1, 2, 9, 4, 5, 6, 7, 8]) is None  # the first block differs
    assert PrefixCache("other model", block=4).lookup(list(range(10))) is None
    # a turn that started from entry 1 at 8 holds only its own blocks, and answers for them
    c.acquire(a)
    b = c.retain(2, [*range(8), 20, 21, 22, 23, 24], held=5, base=a, base_len=8)
    assert b is not None and c.held_tokens == 15
    hit = c.lookup([*range(8), 20, 21, 22, 23, 24, 25])
    assert hit is not None and hit.entry is b and hit.length == 12
    assert c.retain(3, [1, 2], held=2, base=None, base_len=0) is None  # no whole block: nothing to keep


def test_only_unreferenced_entries_are_evicted_least_recently_used_first():
    c = PrefixCache("m", block=4)
    e1 = c.retain(1, list(range(8)), 8, None, 0)
    e2 = c.retain(2, list(range(100, 108)), 8, None, 0)
    e3 = c.retain(3, list(range(200, 208)), 8, None, 0)
    assert e1 and e2 and e3
    c.acquire(e1)  # in use: never evicted
    c.acquire(e2)
    c.release(e2)  # used more recently than e3
    assert c.evict(1) == [3]
    assert c.evict(100) == [2]  # all it can: e1 is in use
    assert c.lookup([*range(8), 1]) is not None and c.lookup([*range(100, 108), 1]) is None
    c.release(e1)
    assert c.evict(1) == [1] and len(c) == 0 and c.evicted == 3
    # a base referenced by a later turn is kept until that turn goes
    a = c.retain(4, list(range(8)), 8, None, 0)
    assert a is not None
    c.acquire(a)
    b = c.retain(5, [*range(8), 1, 2, 3, 4], 4, a, 8)
    assert b is not None and c.evict(1) == [5] and c.evict(1) == [4]
    assert c.clear() == [] and c.held_tokens == 0


def test_a_stage_joins_a_chain_of_shared_prefixes_with_every_position_in_place():
    """Turns of a conversation each start from the one before (a chain of bases): a step of the
    last turn attends over every position in order, the bases' and its own, and each piece is
    read from the cache that holds it (nothing copied into the bases, nothing written below a
    shared prefix)."""
    import torch

    store = KVStore(10_000)

    def step(rid: int, start: int, n: int, base: int = 0, base_len: int = 0):
        r = store.start(rid, 0, base, base_len) if base or start == 0 else store.get(rid)
        assert r is not None
        positions = torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4)
        k, v = PackedCache([PackedSegment(r, start, 0, n)]).update(positions, -positions, 0)
        r.length = start + n
        return k, v

    step(1, 0, 40)  # turn 1 holds [0, 40)
    step(2, 32, 20, base=1, base_len=32)  # turn 2: [0, 32) from turn 1, [32, 52) its own
    step(3, 48, 10, base=2, base_len=48)  # turn 3: [0, 32) turn 1, [32, 48) turn 2, [48, 58) own
    k, v = step(3, 58, 1)  # a decode step of turn 3
    want = torch.arange(59, dtype=torch.float32)
    assert torch.equal(k[0, 0, :, 0], want) and torch.equal(v[0, 1, :, 3], -want)
    # the bases still hold exactly what they wrote (turn 1's positions 32-39 were never overwritten)
    first = store.get(1)
    assert first is not None
    k1, _ = first.prefix(0, 40)
    assert torch.equal(k1[0, :, 0], torch.arange(40, dtype=torch.float32))
    assert store.used_tokens == 40 + 20 + 11  # a shared prefix counts once


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("prefix") / "llama", num_layers=4, seed=11)


def test_a_conversation_reuses_its_history_and_answers_as_transformers_with_and_without(llama):
    parts = conversation(list(range(3, 43)), 4, 1)

    async def main():
        async with Cluster(llama, workers=3) as c:
            cached = await chat(c, parts)
            c.engine.kv.caching = False
            plain = await chat(c, parts)
            return cached, plain, c.engine.kv.prefix.held_tokens, c.master.group.kv_tokens

    cached, plain, held, budget = run(main())
    for (prompt, answer, _), (p2, a2, reused) in zip(cached, plain):
        assert answer == reference_greedy(llama, prompt, NEW) == a2 and p2 == prompt and reused == 0
    reused = [r for _, _, r in cached]
    assert reused[0] == 0 and all(r > 0 for r in reused[1:]), reused
    # a turn reuses all of its history but the partial last block and the last answer token
    for (prompt, _, r), (before, answer, _) in zip(cached[1:], cached):
        history = len(before) + len(answer) - 1
        assert r == history // 16 * 16 and r <= len(prompt) - 1, (r, history, len(prompt))
    assert 0 < held <= budget


def test_eviction_under_pressure_never_serves_an_overwritten_prefix(llama):
    """Many conversations through a small KV budget: cached prefixes are evicted all the time
    (and their ids' memory reused for others); every answer is still transformers'."""
    convs = [conversation([(11 * i + k) % 250 + 3 for k in range(20 + 3 * i)], 3, i) for i in range(6)]

    async def main():
        async with Cluster(llama, workers=2, max_kv_tokens=BUDGET, max_batch_tokens=32) as c:
            got = await asyncio.gather(*(chat(c, parts) for parts in convs))
            return got, c.engine.kv.prefix.evicted, c.engine.preemptions, c.engine.kv.prefix.held_tokens

    got, evicted, preemptions, held = run(main(), 600)
    assert evicted > 0, "the test needs evictions"
    for turns in got:
        for prompt, answer, _ in turns:
            assert answer == reference_greedy(llama, prompt, NEW)
    assert sum(r > 0 for turns in got for _, _, r in turns) > 0, "no turn reused a prefix"
    assert held <= BUDGET


def test_a_re_plan_mid_conversation_forgets_the_cache_and_answers_stay_identical(llama):
    parts = conversation(list(range(50, 90)), 4, 2)

    async def main():
        async with Cluster(llama, workers=3, min_workers=2) as c:
            first = await chat(c, parts[:2])
            epoch = c.master.group.epoch
            c.tasks[1].cancel()  # a worker disappears: a new pipeline on two stages
            while c.master.group.epoch == epoch or not c.master.group.serving:
                await asyncio.sleep(0.02)
            assert len(c.engine.kv.prefix) == 0
            history = first[-1][0] + first[-1][1]
            rest = await chat(c, [history + parts[2], parts[3]])
            return first + rest

    turns = run(main())
    for prompt, answer, _ in turns:
        assert answer == reference_greedy(llama, prompt, NEW)
    reused = [r for _, _, r in turns]
    assert reused[1] > 0 and reused[2] == 0 and reused[3] > 0, reused  # the new pipeline starts cold


def test_the_api_reports_cached_prompt_tokens_streamed_and_not(llama):
    user = " ".join(["friends pool their cards to serve one model over slow links"] * 4)

    async def main():
        async with Cluster(llama, workers=2) as c, aiohttp.ClientSession() as http:
            messages = [{"role": "user", "content": user}]
            body = {"model": c.master.model_id, "messages": messages, "max_tokens": 6, "temperature": 0}
            async with http.post(f"{c.base_url}/v1/chat/completions", json=body) as r:
                one = await r.json()
            messages += [one["choices"][0]["message"], {"role": "user", "content": "and again " + user}]
            body = {**body, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
            usage = None
            async with http.post(f"{c.base_url}/v1/chat/completions", json=body) as r:
                async for line in r.content:
                    text = line.decode().strip()
                    if text.startswith("data: {"):
                        usage = json.loads(text[6:]).get("usage") or usage
            completion = {"model": c.master.model_id, "prompt": "x " + user, "max_tokens": 2, "temperature": 0}
            async with http.post(f"{c.base_url}/v1/completions", json=completion) as r:
                cold = await r.json()
            async with http.post(f"{c.base_url}/v1/completions", json=completion) as r:
                warm = await r.json()
            return one["usage"], usage, cold["usage"], warm["usage"]

    one, two, cold, warm = run(main())
    assert one["prompt_tokens_details"] == {"cached_tokens": 0}
    assert two is not None and 16 <= two["prompt_tokens_details"]["cached_tokens"] < two["prompt_tokens"]
    # the whole first turn's prompt is history now (but its partial last block)
    assert two["prompt_tokens_details"]["cached_tokens"] >= one["prompt_tokens"] // 16 * 16
    assert cold["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm["prompt_tokens_details"]["cached_tokens"] == (warm["prompt_tokens"] - 1) // 16 * 16


def test_turn_ids_give_a_remembered_answers_generated_ids_then_tokenize_the_rest():
    from master_core.turn_ids import TurnIds

    def tokenize(text: str) -> list[int]:
        return [ord(c) for c in text]

    t = TurnIds(max_entries=2, max_chars=40)
    assert t.ids("ab", tokenize) == [97, 98] and t.hits == 0
    t.remember("<p>", [1, 2], "xy", [7])  # "xy" was generated as one token
    assert t.ids("<p>xy!", tokenize) == [1, 2, 7, 33] and t.hits == 1
    assert t.ids("<p>xz!", tokenize) == tokenize("<p>xz!")  # the answer was changed: no match
    assert t.ids("<p>xy", tokenize) == tokenize("<p>xy")  # only a strict prefix is replaced
    t.remember("<p>xy!", [1, 2, 7, 33], "z", [9])  # the next turn: the longest match wins
    assert t.ids("<p>xy!z.", tokenize) == [1, 2, 7, 33, 9, 46]
    t.remember("q", [5], "r", [6])  # a third entry drops the least recently used
    assert len(t) == 2 and t.ids("<p>xy!", tokenize) == tokenize("<p>xy!")
    t.remember("s" * 30, [1], "t" * 20, [2])  # more characters than are kept in all: not kept
    assert len(t) == 2
    t.remember("s" * 30, [1], "t" * 9, [2])  # 39 characters: the older entries make room
    assert len(t) == 1 and t.ids("s" * 30 + "t" * 9 + "u", tokenize) == [1, 2, 117]
