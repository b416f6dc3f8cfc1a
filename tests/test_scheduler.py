"""The pure scheduler with fabricated costs: its promises, checked directly."""

import random

import pytest

from master_core.costs import CostSnapshot, LinkCost, StageCost
from master_core.scheduler import (
    POLICIES, Candidate, KVView, admit_and_preempt, chunk_tokens, cycle_time, microbatch_count, plan_microbatch, policy,
)

HIDDEN = 8192 * 2  # a 70B-class model in fp16: bytes per token between stages


def costs(stages=4, compute=0.010, per_token=0.0002, rtt=0.040, mbps=100.0) -> CostSnapshot:
    return CostSnapshot(
        stage_fixed=(compute,) * stages,
        stage_per_token=(per_token,) * stages,
        link_rtt=(rtt,) * stages,
        link_bandwidth=(mbps * 1e6 / 8,) * stages,
        hidden_bytes_per_token=HIDDEN,
        logits_bytes_per_row=(1 + 2 * 64) * 4,  # top-64 rows
    )


@pytest.mark.parametrize("stages", [2, 4, 8])
@pytest.mark.parametrize("active", [1, 3, 16, 64])
@pytest.mark.parametrize("rtt", [0.0005, 0.02, 0.04])
def test_enough_microbatches_that_no_stage_idles(stages, active, rtt):
    c = costs(stages=stages, rtt=rtt)
    k = microbatch_count(POLICIES["full"], c, stages, active)
    assert 1 <= k <= max(1, active)
    b = -(-active // k)
    cycle, bottleneck = cycle_time(c, b, b)
    # with k in flight the bottleneck is busy k*bottleneck of every cycle: no idling, unless
    # there are simply too few requests to split further
    assert k * bottleneck >= cycle or k == min(active, POLICIES["full"].max_microbatches)
    if k > 1:  # and not more than needed
        b1 = -(-active // (k - 1))
        cyc1, bot1 = cycle_time(c, b1, b1)
        assert (k - 1) * bot1 < cyc1


def test_fixed_policies_do_not_adapt():
    c = costs()
    assert microbatch_count(POLICIES["fixed-microbatches"], c, 4, 50) == 4
    assert microbatch_count(POLICIES["single-microbatch"], c, 4, 50) == 1


def test_chunk_size_follows_measured_bandwidth():
    p = policy("full", 4096)
    sizes = [chunk_tokens(p, costs(mbps=m), decode_tokens=8, microbatches=4) for m in (20, 100, 1000)]
    assert sizes[0] < sizes[1] < sizes[2]
    # above the floor, the chunk fits in the gap before the next decode micro-batch needs the
    # busiest link: its transfer plus the decode traffic there take at most cycle / K
    for m in (100, 1000):
        c = costs(mbps=m)
        n = chunk_tokens(p, c, 8, 4)
        cycle, _ = cycle_time(c, 8, 8)
        decode_link = 8 * 2 * HIDDEN / c.link_bandwidth[0]
        assert n > p.min_chunk and n * 2 * HIDDEN / c.link_bandwidth[0] + decode_link <= cycle / 4
    assert chunk_tokens(policy("no-chunking", 4096), costs(), 8, 4) == 4096 - 8


def test_chunk_floor_and_cap():
    p = policy("full", 256)
    assert chunk_tokens(p, costs(mbps=0.001), 8, 4) == p.min_chunk  # prefill never starves
    assert chunk_tokens(p, costs(mbps=1e6, per_token=1e-9), 8, 4) == 248  # never beyond the step cap
    assert chunk_tokens(p, None, 0, 1) == p.default_chunk


def test_decode_never_waits_behind_more_than_one_chunk_and_prefill_never_starves():
    rng = random.Random(0)
    for _ in range(500):
        cands = []
        for i in range(rng.randint(1, 40)):
            total = rng.randint(2, 3000)
            sched = rng.choice([total - 1, 0, rng.randint(0, total - 1)])
            cands.append(Candidate(i, sched, total, i, in_flight=rng.choice([0, 0, 1]) if sched > 0 else 0))
        max_decodes, budget = rng.randint(0, 20), rng.randint(0, 600)
        plan = plan_microbatch(cands, max_decodes=max_decodes, prefill_tokens=budget, min_chunk=16)
        ids = [c.request_id for c in plan]
        assert len(ids) == len(set(ids))
        decodes = [c for c in plan if c.length == 1 and c.want_logits and next(x for x in cands if x.request_id == c.request_id).total - c.start == 1]
        prefill = sum(c.length for c in plan if c not in decodes)
        assert prefill <= max(budget, 16)  # at most one chunk's worth rides along with decode steps
        ready = [c for c in cands if c.total - c.scheduled == 1 and c.in_flight == 0]
        assert len(decodes) == min(max_decodes, len(ready))  # decodes always go first
        waiting_prefill = [c for c in cands if c.total - c.scheduled > 1 and (c.in_flight == 0 or c.scheduled > 0)]
        if waiting_prefill:
            assert prefill >= min(16, sum(c.total - c.scheduled for c in waiting_prefill))
        for c in plan:  # chunks continue exactly where the request stands
            src = next(x for x in cands if x.request_id == c.request_id)
            assert c.start == src.scheduled and c.start + c.length <= src.total
            assert c.want_logits == (c.start + c.length == src.total)


def test_kv_budget_is_never_exceeded():
    rng = random.Random(1)
    budget = 2000
    running: dict[int, KVView] = {}
    waiting: list[tuple[int, int]] = []
    next_id = 0
    for step in range(3000):
        if rng.random() < 0.3:
            waiting.append((next_id, rng.randint(1, 600)))
            next_id += 1
        admit, preempt = admit_and_preempt(list(running.values()), waiting, budget, max_running=32)
        for rid in preempt:
            v = running.pop(rid)
            waiting.insert(0, (rid, v.total))
        for rid in admit:
            tokens = dict(waiting)[rid]
            waiting.remove((rid, tokens))
            running[rid] = KVView(rid, tokens, step, False)
        # every running request holds its tokens plus the next one: within the budget
        assert sum(v.total + 1 for v in running.values()) <= budget or len(running) == 1
        for rid, v in list(running.items()):  # decode a token; some finish
            if rng.random() < 0.05:
                del running[rid]
            else:
                running[rid] = KVView(rid, v.total + 1, v.order, False)
    assert next_id > 500


def test_preemption_takes_the_youngest_and_admission_waits():
    running = [KVView(1, 500, 0, False), KVView(2, 500, 1, False), KVView(3, 500, 2, False)]
    admit, preempt = admit_and_preempt(running, [(9, 10)], budget=1200, max_running=8)
    assert preempt == [3] and admit == []
    admit, preempt = admit_and_preempt(running[:2], [(9, 10), (10, 500)], budget=1200, max_running=8)
    assert preempt == [] and admit == [9]


def test_cost_fits_recover_fabricated_lines():
    s, l = StageCost(), LinkCost()
    for t in (1, 16, 64, 256, 1, 16):
        s.observe(t, 0.005 + 0.0001 * t)
        l.observe(t * 1000, 0.02 + t * 1000 / 12.5e6)
    a, b = s.estimate()
    assert a == pytest.approx(0.005, rel=1e-6) and b == pytest.approx(0.0001, rel=1e-6)
    rtt, bw = l.estimate()
    assert rtt == pytest.approx(0.02, rel=1e-6) and bw == pytest.approx(12.5e6, rel=1e-6)
