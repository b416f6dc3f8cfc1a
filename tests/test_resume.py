"""Recovery that keeps what survived: a step given up on (its stages alive, one only late) goes
on from what every stage holds, not from token 0; the answers stay transformers' tokens and no
stage keeps a cache once the requests ended."""

import asyncio
import gc
import threading
import time

import pytest
from harness import Cluster, greedy, run, until, without_copies
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.engine import PROFILE_REQUEST_ID
from worker_core.session import Session

PROMPTS = [list(range(30, 78)), list(range(90, 131))]  # 48 and 41 tokens
NEW = 40
FREEZE = 3.0  # seconds the middle stage stalls: past a step's deadline (1.5 s), short of a hung link's


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("resume") / "llama", num_layers=6, seed=11)


@pytest.fixture(scope="module")
def want(ckpt):
    return [reference_greedy(ckpt, p, NEW) for p in PROMPTS]


def _sessions() -> list[Session]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Session and o.runner is not None and not o.ws.closed]


def _freeze_middle_stage_once(seconds: float) -> threading.Event:
    """The next step the middle stage computes stalls ``seconds`` first (its thread sleeps; the
    worker's loop answers pings meanwhile): set the returned event to arm it."""
    middle = next(s for s in _sessions() if not s.runner.shard.is_first and not s.runner.shard.is_last)
    runner = middle.runner
    plain = runner.run
    armed = threading.Event()

    def stalled(*args, **kw):
        if armed.is_set():
            armed.clear()
            time.sleep(seconds)
        return plain(*args, **kw)

    runner.run = stalled  # type: ignore[method-assign]  # the test stalls this stage on purpose
    return armed


@pytest.mark.parametrize("loop_back", [False, True], ids=["master-driven", "looped-back"])
def test_a_step_given_up_on_goes_on_from_what_every_stage_holds(ckpt, want, monkeypatch, loop_back):
    import master_core.link

    monkeypatch.setattr(master_core.link, "STEP_DEADLINE_FLOOR", 1.5)  # steps here take milliseconds

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            g, e = c.master.group, c.engine
            e.loop_back = loop_back
            start, links = g.epoch, len(g.links)
            assert all(h.direct for h in g.hops), [h.describe() for h in g.hops]
            while not e.profiled:
                await asyncio.sleep(0.01)
            armed = _freeze_middle_stage_once(FREEZE)
            gens = [asyncio.create_task(e.generate(p, greedy(NEW))) for p in PROMPTS]
            while e.tokens_generated < 8:
                await asyncio.sleep(0.005)
            armed.set()
            got = await asyncio.wait_for(asyncio.gather(*gens), 60)
            assert not armed.is_set(), "the middle stage never stalled"
            counts = (g.epoch - start, links - len(g.links), e.kv.resumed, e.replays, e.kv.recomputed_tokens)
            e.kv.forget_idle()  # the ended requests' caches were kept for reuse: drop them
            deadline = time.monotonic() + 5
            while any(len(s.runner.kv) for s in _sessions()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            left = [len(s.runner.kv) for s in _sessions()]
            return [r[0] for r in got], counts, left, e.held()

    got, (epochs, lost, resumed, replays, recomputed), left, held = run(main())
    assert got == want
    assert epochs == 0 and lost == 0, "a stage that was only late was dropped"
    assert resumed >= 1 and replays == 0, (resumed, replays)
    # what was in flight went again (a decode token per request and, looped back, the tokens it
    # ran ahead), never a prompt: a restart from 0 sends 41 + 48 prompt tokens and the outputs
    assert 0 < recomputed <= len(PROMPTS) * 9, recomputed
    assert left == [0, 0, 0] and held == {"running": 0, "waiting": 0, "text_streams": 0}, (left, held)


@pytest.mark.parametrize(
    ("lost", "copied"),
    [(0, False), (1, False), (2, False), (0, True), (1, True), (2, True)],
    ids=["first", "middle", "last", "first-copied", "middle-copied", "last-copied"],
)
def test_a_lost_stage_is_rebuilt_on_a_spare_and_the_others_keep_their_caches(ckpt, want, lost, copied, monkeypatch):
    """A stage dies mid-generation with a member standing by: the spare takes its layers, only
    its positions are computed (from the token ids, or from what the stage before it kept), the
    other stages keep their caches (the same KV ids, the same cache objects) and the tokens are
    transformers'.  ``copied``: the spare had copied the prompts meanwhile
    (:mod:`master_core.shadow`, the stages' links slowed so that it has the time): it keeps
    those positions of the range and computes only the rest; else it copies nothing."""
    from master_core.group import Group

    slow = [{"link_delay_ms": 15} for _ in range(3)] if copied else None
    if not copied:  # nor does a stage keep a copy of the next one's layers (it would take the range)
        monkeypatch.setattr(Group, "shadow_target", lambda self: None)
        without_copies(monkeypatch)
    # the engine's supervision looks only this often: the rebuild must not wait for it
    monkeypatch.setattr("master_core.engine.LANE_SUPERVISION", 30.0)
    rebuilds: list[float] = []  # when the engine began each pipeline's rebuild (or found none to do)

    async def main():
        async with Cluster(ckpt, workers=3, worker_options=slow) as c:
            g, e = c.master.group, c.engine
            rebuild = e._rebuild_lost

            async def timed() -> bool:
                rebuilds.append(time.monotonic())
                return await rebuild()

            e._rebuild_lost = timed
            # a much slower link than the stages': it stands by (at 20 ms beside stages of 15 ms the
            # planner sometimes gave it a stage)
            c.add_worker("spare", link_delay_ms=80 if copied else 20)

            def standing() -> str:
                return f"group {g.state.name}, links {[x.name for x in g.links]}, standby {g.standby}"

            await until(lambda: len(g.links) == 4 and "spare" in g.standby and g.serving, 60, standing)
            spare = next(x for x in g.links if x.name == "spare")

            def whole() -> bool:  # it loads the whole model while it stands by
                a = spare.assignment
                return a is not None and (a.layer_start, a.layer_end) == (0, 6)

            await until(whole, 60, standing)
            await until(lambda: e.profiled, 60, standing)
            gens = [asyncio.create_task(e.generate(p, greedy(NEW))) for p in PROMPTS]
            deadline = time.monotonic() + 60
            while e.tokens_generated < 12 or (copied and e.shadow.copied < sum(map(len, PROMPTS))):
                assert e.tokens_generated < len(PROMPTS) * NEW - 4, "the requests ended before the spare copied"
                assert time.monotonic() < deadline, f"no copy within 60 s: {e.shadow.describe()}, {e.shadow.copied}"
                await asyncio.sleep(0.005)
            survivors = [s.name for i, s in enumerate(g.stages) if i != lost]
            kv_ids = {r.id: r.kv_id for r in e.running.values()}
            kept_ranges = {(x.assignment.layer_start, x.assignment.layer_end) for x in g.stages if x.assignment}
            kept_ranges.discard((g.stages[lost].assignment.layer_start, g.stages[lost].assignment.layer_end))
            holders = [s for s in _sessions() if (s.runner.shard.layer_start, s.runner.shard.layer_end) in kept_ranges]
            caches = {
                (id(s.runner), k): s.runner.kv.get(k) for s in holders for k in kv_ids.values() if s.runner.kv.get(k)
            }
            gone = g.stages[lost]
            gone.close_with("lost (the test)")  # the master sees it go at once, as a kill's reset shows it
            c.tasks[int(gone.name[1:])].cancel()  # and the worker stops

            def where() -> str:
                stages = [(s.name, s.state.name) for s in g.stages]
                links = [x.name for x in g.links]
                return f"group {g.state.name} epoch {g.epoch} stages {stages} repairs {g.repairs} links {links}"

            await until(lambda: bool(g.serving and g.stages and g.stages[lost].name == "spare"), 60, where, 0.005)
            served = time.monotonic()
            await until(lambda: e.rebuilt_requests > 0 or e.replays > 0, 60, where, 0.005)
            waited = rebuilds[-1] - served  # from the repaired pipeline serving to its rebuild (within 5 ms)
            still = {key: s.runner.kv.get(key[1]) for s in _sessions() for key in caches if key[0] == id(s.runner)}
            same_ids = {r.id: r.kv_id for r in e.running.values()} == kv_ids
            got = await asyncio.wait_for(asyncio.gather(*gens), 60)
            names = [s.name for s in g.stages]
            counts = (g.repairs, e.rebuilt_requests, e.kv.reset_restarts, e.replays, e.rebuilt_tokens)
            kept = sum(still.get(k) is v for k, v in caches.items())
            e.kv.forget_idle()
            deadline = time.monotonic() + 5
            while any(len(s.runner.kv) for s in _sessions()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            left = [len(s.runner.kv) for s in _sessions()]
            if any(left):  # what is left, where, and what the master's ledger still knows of (a rare failure)
                where = [
                    (s.runner.shard.layer_start, s.runner.shard.layer_end, [k for k, _ in s.runner.kv.items()])
                    for s in _sessions()
                ]
                left = [*left, where, kv_ids, e.kv.prefix.held_tokens, names]
            outs = [r[0] for r in got]
            return outs, names, survivors, counts, same_ids, kept, len(still), e.rebuilt_held, left, waited

    got, names, survivors, counts, same_ids, kept, alive, held, left, waited = run(main())
    repairs, rebuilt, restarts, replays, positions = counts
    assert waited < 0.5, f"the rebuild began {waited:.2f} s after the repaired pipeline served"
    assert got == want
    assert names[lost] == "spare" and [n for i, n in enumerate(names) if i != lost] == survivors
    assert (repairs, rebuilt, restarts, replays) == (1, 2, 0, 0), counts
    assert same_ids, "a request was given a new KV id: it was computed again from scratch"
    assert alive == 4 and kept == 4, "the surviving stages' cache objects were replaced"  # 2 stages x 2 requests
    # the prompts and what was generated, on the spare only: computed at the repair, or before it, copying
    assert 89 <= positions + held <= 89 + 2 * NEW, (positions, held)
    assert held >= 89 if copied else held == 0, held
    assert left == [0, 0, 0], left  # no cache left anywhere once the requests ended (the copy's neither)


def test_a_rebuild_packs_each_requests_positions_in_order_within_the_step_budget():
    from master_core.rebuild import Lost, pack

    steps = pack([Lost(1, 2, 70, []), Lost(2, 1, 0, []), Lost(3, 5, 20, [])], 32)
    assert [sum(s.length for s in step) for step in steps] == [32, 32, 26]
    spans = [(s.request_id, s.start, s.length, s.generation) for step in steps for s in step]
    assert spans == [(1, 0, 32, 2), (1, 32, 32, 2), (1, 64, 6, 2), (3, 0, 20, 5)]
    assert all(len({s.request_id for s in step}) == len(step) for step in steps)
    assert not any(s.want_logits for step in steps for s in step)


def test_the_replacement_is_the_fastest_standby_member_that_holds_the_range():
    from master_core.placement import Member, ModelShape, replacement

    shape = ModelShape(num_layers=8, layer_bytes=100, first_bytes=500, last_bytes=500, kv_bytes_per_layer=10)
    slow, fast, small = Member("slow", 10_000, 2.0), Member("fast", 10_000, 1.0), Member("small", 500, 0.1)
    far = Member("far", 10_000, 0.1, link_seconds=5.0)
    assert replacement(shape, [slow, fast, small, far], 2, 5) == 2  # 330 bytes: every one holds it
    assert replacement(shape, [slow, fast, small, far], 0, 3) == 1  # with the embeddings: not "small"
    assert replacement(shape, [slow, small], 5, 8) == 0  # with the head
    assert replacement(shape, [small], 0, 8) is None


def test_without_a_spare_the_neighbour_whose_memory_holds_both_ranges_takes_the_lost_layers():
    from master_core.placement import Member, ModelShape, widening

    shape = ModelShape(num_layers=8, layer_bytes=100, first_bytes=500, last_bytes=500, kv_bytes_per_layer=10)
    ranges = [(0, 3), (3, 5), (5, 8)]
    big, fast, small = Member("big", 10_000, 2.0), Member("fast", 10_000, 1.0), Member("small", 300, 0.1)
    assert widening(shape, ranges, 1, {0: big, 2: fast}) == ((2, (3, 8)),)  # both hold 5 layers: the faster
    assert widening(shape, ranges, 1, {0: fast, 2: big}) == ((0, (0, 5)),)
    assert widening(shape, ranges, 1, {0: small, 2: big}) == ((2, (3, 8)),)  # "small" holds 3 layers, not 5
    assert widening(shape, ranges, 0, {1: big}) == ((1, (0, 5)),)  # with the embeddings
    assert widening(shape, ranges, 2, {1: big}) == ((1, (3, 8)),)  # with the head
    assert widening(shape, ranges, 1, {0: small, 2: small}) is None  # nobody: the whole pipeline is planned again


def test_where_neither_neighbour_holds_both_ranges_they_split_the_lost_one():
    """Each neighbour takes the part of the lost range its memory holds; of the cuts that fit,
    the one whose slower widened stage computes fastest."""
    from master_core.placement import Member, ModelShape, widening

    shape = ModelShape(num_layers=10, layer_bytes=100, first_bytes=500, last_bytes=500, kv_bytes_per_layer=0)
    ranges = [(0, 3), (3, 7), (7, 10)]
    five = 500 + 5 * 100  # five layers beside the embeddings or the head
    a, b = Member("a", five, 1.0), Member("b", five, 1.0)
    assert widening(shape, ranges, 1, {0: a, 2: b}) == ((0, (0, 5)), (2, (5, 10)))  # 5 and 5 layers
    slow = Member("slow", 500 + 6 * 100, 3.0)  # holds 6 layers, computes 3x slower: takes 1 of the 4
    assert widening(shape, ranges, 1, {0: slow, 2: Member("c", 500 + 6 * 100, 1.0)}) == ((0, (0, 4)), (2, (4, 10)))
    four = Member("four", 500 + 4 * 100, 1.0)  # 4 + 4 < 3 + 4 + 3 layers: no cut fits
    assert widening(shape, ranges, 1, {0: four, 2: four}) is None
    assert widening(shape, ranges, 0, {1: a}) is None  # the first stage has one neighbour: no split
    assert widening(shape, [(0, 5), (5, 10)], 1, {0: a}) is None


def test_a_stage_whose_compute_hangs_while_its_loop_lives_is_dropped_within_the_stuck_limit(ckpt, want):
    """The middle stage's compute blocks inside a layer (a stuck driver) while its event loop
    answers pings: its pulses show no progress, the master drops it within ``STUCK_LIMIT``
    beyond the step's predicted time (not the 10 s step deadline), the spare takes its layers
    and the streams end with transformers' tokens."""
    from master_core import liveness as L
    from master_core.link import LinkState

    release, stuck_at = threading.Event(), []

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            g, e = c.master.group, c.engine
            c.add_worker("spare", link_delay_ms=20)
            while not (len(g.links) == 4 and "spare" in g.standby and g.serving):
                await asyncio.sleep(0.02)
            while not e.profiled:
                await asyncio.sleep(0.01)
            middle = g.stages[1]
            layer = next(s for s in _sessions() if not s.runner.shard.is_first and not s.runner.shard.is_last)
            layer = layer.runner.shard.layers[0]
            plain = layer.forward

            def forward(*args, **kw):  # on the stage's compute thread
                if not stuck_at:
                    stuck_at.append(time.monotonic())
                    release.wait(30)  # stuck until the test ends
                return plain(*args, **kw)

            gens = [asyncio.create_task(e.generate(p, greedy(NEW))) for p in PROMPTS]
            while e.tokens_generated < 12:
                await asyncio.sleep(0.005)
            layer.forward = forward
            while middle.state is not LinkState.GONE:
                await asyncio.sleep(0.01)
            dropped = time.monotonic() - stuck_at[0]
            got = await asyncio.wait_for(asyncio.gather(*gens), 60)
            release.set()
            return [r[0] for r in got], dropped, middle.gone_reason, g.repairs, [s.name for s in g.stages]

    try:
        got, dropped, why, repairs, names = run(main())
    finally:
        release.set()
    assert got == want
    assert "computing without progress" in why, why
    assert dropped < L.STUCK_LIMIT + 1.5, dropped  # a pulse every PING_INTERVAL, a decode step's few ms
    assert repairs == 1 and names[1] == "spare"


def test_ranges_carved_from_the_whole_model_compute_what_loaded_ranges_do(ckpt):
    """A standby member's whole model, carved into the ranges of a pipeline (what a repair
    takes from memory), gives the logits of the ranges loaded on their own."""
    import torch

    from worker_core.shard import ShardError, carve, load_shard
    from worker_core.stage import StageRunner
    from worker_core.wire import Segment

    cpu = torch.device("cpu")
    whole = load_shard(ckpt, 0, 6, cpu, torch.float32)
    seg = (Segment(1, 0, len(PROMPTS[0]), True, 1),)
    outs = []
    for shards in (
        [load_shard(ckpt, a, b, cpu, torch.float32) for a, b in ((0, 2), (2, 5), (5, 6))],
        [carve(whole, a, b) for a, b in ((0, 2), (2, 5), (5, 6))],
    ):
        x = torch.tensor(PROMPTS[0])
        for shard in shards:
            x = StageRunner(shard, 1024, 256).run(seg, x)
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
    assert carve(whole, 2, 5).embed is None and carve(whole, 5, 6).lm_head is not None
    with pytest.raises(ShardError):
        carve(load_shard(ckpt, 0, 3, cpu, torch.float32), 2, 5)  # layers it does not hold


def test_a_standby_copy_narrowed_to_a_range_holds_what_that_range_loaded_on_its_own_holds(ckpt):
    """A standby's whole model computes two requests in steps of token ids (as ``master_core.shadow``
    sends them), keeping the rows at the stage ends 2 and 5; narrowed to [2, 5) its caches and
    the rows it recalls are those of the range loaded on its own after [0, 2), nothing else is
    kept, and it goes on from there like that range."""
    import torch

    from worker_core.shard import carve, load_shard
    from worker_core.stage import StageRunner
    from worker_core.wire import Segment

    cpu = torch.device("cpu")
    whole = StageRunner(load_shard(ckpt, 0, 6, cpu, torch.float32), 4096, 256, tapes=(2, 5))
    first, middle = (StageRunner(load_shard(ckpt, a, b, cpu, torch.float32), 4096, 256) for a, b in ((0, 2), (2, 5)))
    a, b = PROMPTS
    for segs in [  # in pieces, the two requests packed together, as the copy goes
        (Segment(1, 0, 20, False, 1),),
        (Segment(1, 20, 28, False, 1), Segment(2, 0, 30, False, 1)),
        (Segment(2, 30, 11, False, 1),),
    ]:
        ids = torch.tensor([t for s in segs for t in (a if s.request_id == 1 else b)[s.start : s.start + s.length]])
        whole.run(segs, ids)
        middle.run(segs, first.run(segs, ids))
    carried = whole.kv.narrowed(2, 5, 4096)
    stage = StageRunner(carve(whole.shard, 2, 5), 4096, 256, kv=carried)
    assert len(whole.kv) == 0 and len(carried) == 2
    for rid, n in ((1, 48), (2, 41)):
        mine, theirs = carried.get(rid), middle.kv.get(rid)
        assert mine is not None and theirs is not None and mine.length == theirs.length == n
        assert sorted(mine.keys) == [2, 3, 4] and sorted(mine.tapes) == [5]  # that range's layers, its own tape
        for local, layer in enumerate((2, 3, 4)):
            assert torch.allclose(mine.keys[layer][:, :n], theirs.keys[local][:, :n], atol=1e-5)
            assert torch.allclose(mine.values[layer][:, :n], theirs.values[local][:, :n], atol=1e-5)
    recall = (Segment(1, 0, 48, False), Segment(2, 5, 36, False))
    assert torch.allclose(stage.recall(recall), middle.recall(recall), atol=1e-5)
    nxt = (Segment(1, 48, 1, False, 2), Segment(2, 41, 1, False, 2))  # the next token, a newer generation
    x = first.run(nxt, torch.tensor([5, 6]))
    assert torch.allclose(stage.run(nxt, x), middle.run(nxt, x), atol=1e-5)


def test_a_newcomer_re_plans_a_busy_group_only_once_the_replay_it_causes_is_cheap(ckpt, monkeypatch):
    """A worker that would change the pipeline joins when no request runs; past the join wait
    it goes only once replaying the running requests would be cheap (or after the hard limit),
    not into the middle of long requests: a re-plan recomputes them on every stage."""
    import master_core.group as G

    monkeypatch.setattr(G, "JOIN_REPLAN_WAIT", 0.3)
    # 5 ms each way on every link, so the 400 tokens take seconds: on a quiet machine they took
    # about as long as the waits below, and the request had ended before it could be overtaken
    slow = {"link_delay_ms": 5.0}

    async def main():
        async with Cluster(ckpt, workers=2, worker_options=[slow, slow]) as c:
            g, e = c.master.group, c.engine
            cost = [100.0]  # seconds the replay would take, as the master would estimate it
            g.replay_cost = lambda: cost[0]
            long = asyncio.create_task(e.generate(PROMPTS[0], greedy(400)))
            while e.tokens_generated < 5:
                await asyncio.sleep(0.005)
            epoch = g.epoch
            c.add_worker("w2", **slow)
            while len(g.links) < 3:
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)  # past the join wait, the replay still dear
            waited = (g.epoch == epoch, not long.done())
            cost[0] = 0.5  # now cheap: the newcomer goes, the request still running
            while g.epoch == epoch:
                await asyncio.sleep(0.01)
            went_while_running = not long.done()
            got = (await long)[0]
            return waited, went_while_running, got, len(g.stages)

    waited, went_while_running, got, stages = run(main())
    assert waited == (True, True), "the newcomer re-planned into a long request although the replay was dear"
    assert went_while_running and stages == 3
    assert got == reference_greedy(ckpt, PROMPTS[0], 400)


def test_a_standby_copy_handed_over_mid_step_keeps_or_frees_what_that_step_wrote():
    """The pipeline changes while a step of the copy is out (its result may never be read): a
    repair gets its KV ids with the positions before it (so the rebuild starts there), a re-plan
    frees them on the member with the rest; nothing it wrote is left unaccounted for."""
    from master_core.shadow import Shadow

    class Member:
        def __init__(self) -> None:
            self.freed: list[int] = []

        def free(self, ids) -> None:
            self.freed += list(ids)

    for lost in (1, None):
        member = Member()
        shadow = Shadow(None, lambda: [], iter(range(1, 100)))  # type: ignore[arg-type]  # only handover/take here
        shadow._link, shadow._held = member, {7: 48, 8: 16}  # type: ignore[assignment]
        shadow._sending = (member, {8: 16, 9: 0})  # type: ignore[assignment]  # 8 goes on, 9 starts
        shadow.handover(lost)
        if lost is None:
            assert sorted(member.freed) == [7, 8, 9] and shadow.take(member) == {}  # type: ignore[arg-type]
        else:
            assert member.freed == [] and shadow.take(member) == {7: 48, 8: 16, 9: 0}  # type: ignore[arg-type]
        assert shadow.behind() is None


@pytest.mark.parametrize("side", ["after", "before"])
def test_a_stage_widened_over_its_lost_neighbours_layers_fills_them_and_goes_on_like_that_range(ckpt, side):
    """[2, 4) keeps its caches and takes over [4, 6) ("after": it fills them from the rows it kept
    leaving layer 4) or [0, 2) ("before": from the token ids): the filled layers' keys and values
    equal those of that range loaded on its own, its own layers' caches are the same objects, and
    its next step gives what the ranges give one after the other.  Until a request's positions
    are all filled, its steps and a fill out of order are refused, changing nothing."""
    import torch

    from worker_core.shard import cache_index, join, load_shard
    from worker_core.stage import StageRunner, StepRejected
    from worker_core.wire import Segment

    cpu = torch.device("cpu")
    loaded = {r: load_shard(ckpt, *r, cpu, torch.float32) for r in ((0, 2), (2, 4), (4, 6))}
    first, middle, last = (StageRunner(loaded[r], 4096, 256) for r in ((0, 2), (2, 4), (4, 6)))
    twin = StageRunner(loaded[(2, 4)], 4096, 256)  # the middle's twin: its caches are not carried
    a, b = PROMPTS
    ids = {1: a, 2: b}
    segs = (Segment(1, 0, 48, False, 1), Segment(2, 0, 41, False, 1))
    x = first.run(segs, torch.tensor(a + b))
    last.run(segs, middle.run(segs, x))
    twin.run(segs, x)
    own = {rid: middle.kv.get(rid) for rid in (1, 2)}
    added = (4, 6) if side == "after" else (0, 2)
    shard = join(middle.shard, load_shard(ckpt, *added, cpu, torch.float32))
    wide = StageRunner(shard, 4096, 256, kv=middle.kv, missing=added)
    assert (wide.shard.layer_start, wide.shard.layer_end) == ((2, 6) if side == "after" else (0, 4))
    nxt = (Segment(1, 48, 1, False, 1), Segment(2, 41, 1, False, 1))
    step_in = torch.tensor([5, 6]) if side == "before" else first.run(nxt, torch.tensor([5, 6]))
    with pytest.raises(StepRejected, match="not computed yet"):
        wide.run(nxt, step_in)
    empty = torch.empty(0)

    def given(rid: int, start: int, n: int) -> torch.Tensor:
        return torch.tensor(ids[rid][start : start + n]) if side == "before" else empty

    with pytest.raises(StepRejected, match="does not continue"):
        wide.fill((Segment(1, 8, 8, False, 1),), given(1, 8, 8), *added)  # out of order
    for fill in [(Segment(1, 0, 30, False, 1),), (Segment(1, 30, 18, False, 1), Segment(2, 0, 41, False, 1))]:
        x = torch.cat([given(s.request_id, s.start, s.length) for s in fill]) if side == "before" else empty
        wide.fill(fill, x, *added)
    assert wide.missing is None and not wide.unfilled
    neighbour = first if side == "before" else last
    for rid, n in ((1, 48), (2, 41)):
        mine, theirs = wide.kv.get(rid), neighbour.kv.get(rid)
        assert mine is own[rid] and mine.length == n
        for layer in range(*added):  # under the cache index the joined shard gave that layer
            index = cache_index(wide.shard.layers[layer - wide.shard.layer_start])
            local = layer - added[0]
            assert torch.allclose(mine.keys[index][:, :n], theirs.keys[local][:, :n], atol=1e-5)
            assert torch.allclose(mine.values[index][:, :n], theirs.values[local][:, :n], atol=1e-5)
        assert sorted(mine.keys) == [0, 1, 2, 3]  # its own two layers' and the two filled
        assert sorted(mine.tapes) == ([] if side == "after" else [4]), sorted(mine.tapes)
    if side == "after":
        assert torch.allclose(wide.run(nxt, step_in), last.run(nxt, twin.run(nxt, step_in)), atol=1e-4)
    else:
        recall = (Segment(1, 0, 48, False), Segment(2, 0, 41, False))
        assert torch.allclose(wide.recall(recall), twin.recall(recall), atol=1e-5)
        assert torch.allclose(wide.run(nxt, step_in), twin.run(nxt, first.run(nxt, step_in)), atol=1e-4)


def test_a_stage_keeping_a_copy_of_the_next_stages_layers_serves_its_own_and_takes_the_copy_over(ckpt):
    """[2, 6) loaded, serving [2, 4), its copy [4, 6) filled in the background from the rows its
    steps kept leaving layer 4: its steps give what [2, 4) alone gives; a step that writes below
    what the copy holds cuts the copy back there; once it takes the copy over, only the
    positions the copy lacks are missing, and its next step gives what the two ranges give one
    after the other."""
    import torch

    from worker_core.shard import load_shard
    from worker_core.stage import StageRunner, StepRejected
    from worker_core.wire import Segment

    cpu = torch.device("cpu")
    ranges = ((0, 2), (2, 4), (4, 6))
    first, middle, last = (StageRunner(load_shard(ckpt, *r, cpu, torch.float32), 4096, 256) for r in ranges)
    keeper = StageRunner(load_shard(ckpt, 2, 6, cpu, torch.float32), 4096, 256, serve_end=4)
    assert (keeper.shard.layer_start, keeper.shard.layer_end) == (2, 4) and keeper.missing == (4, 6)
    a, b = PROMPTS
    segs = (Segment(1, 0, 48, False, 1), Segment(2, 0, 41, False, 1))
    x = first.run(segs, torch.tensor(a + b))
    mid = middle.run(segs, x)
    assert torch.allclose(keeper.run(segs, x), mid, atol=1e-5)
    last.run(segs, mid)
    empty = torch.empty(0)
    with pytest.raises(StepRejected, match="does not continue"):
        keeper.fill((Segment(1, 8, 8, False, 1),), empty, 4, 6)  # beyond what the copy holds
    keeper.fill((Segment(1, 0, 48, False, 1), Segment(2, 0, 30, False, 1)), empty, 4, 6)
    keeper.fill((Segment(2, 20, 10, False, 1),), empty, 4, 6)  # again within what it holds: nothing lost
    assert (keeper.copy_held(1), keeper.copy_held(2)) == (48, 30)
    redo = (Segment(1, 40, 8, False, 1),)  # request 1's last 8 positions written again: its copy is cut back
    again = first.run(redo, torch.tensor(a[40:]))
    mid = middle.run(redo, again)
    last.run(redo, mid)
    assert torch.allclose(keeper.run(redo, again), mid, atol=1e-5)
    assert keeper.copy_held(1) == 40
    keeper.take_copy()
    assert (keeper.shard.layer_start, keeper.shard.layer_end) == (2, 6) and keeper.copy is None
    assert keeper.missing == (4, 6) and keeper.unfilled == {1: 40, 2: 30}
    nxt = (Segment(1, 48, 1, False, 1), Segment(2, 41, 1, False, 1))
    step_in = first.run(nxt, torch.tensor([5, 6]))
    with pytest.raises(StepRejected, match="not computed yet"):
        keeper.run(nxt, step_in)
    keeper.fill((Segment(1, 40, 8, False, 1), Segment(2, 30, 11, False, 1)), empty, 4, 6)
    assert keeper.missing is None and not keeper.unfilled
    assert torch.allclose(keeper.run(nxt, step_in), last.run(nxt, middle.run(nxt, step_in)), atol=1e-4)


def test_the_second_stage_keeps_a_copy_of_the_first_from_the_token_ids_and_takes_it_over(ckpt):
    """[0, 6) loaded, serving [2, 4), with copies of the first stage's [0, 2) and the next
    stage's [4, 6): its steps give what [2, 4) alone gives; the first stage's copy is filled from
    the token ids (never from rows it does not keep), is cut back by a step that writes below what
    it holds; once the first stage's layers are taken over (``reshape`` to [0, 4)) the next
    stage's copy is dropped, only the positions the copy lacks are missing, and the stage, now
    first, gives from the token ids what the two ranges give one after the other."""
    import torch

    from worker_core.shard import load_shard
    from worker_core.stage import StageRunner, StepRejected
    from worker_core.wire import Segment

    cpu = torch.device("cpu")
    first, middle = (StageRunner(load_shard(ckpt, *r, cpu, torch.float32), 4096, 256) for r in ((0, 2), (2, 4)))
    keeper = StageRunner(load_shard(ckpt, 0, 6, cpu, torch.float32), 4096, 256, serve_end=4, serve_start=2)
    assert (keeper.shard.layer_start, keeper.shard.layer_end) == (2, 4) and keeper.serves(2, 4, 6, True)
    assert keeper.copying(0, 2) and keeper.copying(4, 6) and not keeper.copying(2, 4)
    a, b = PROMPTS
    segs = (Segment(1, 0, 48, False, 1), Segment(2, 0, 41, False, 1))
    x = first.run(segs, torch.tensor(a + b))
    assert torch.allclose(keeper.run(segs, x), middle.run(segs, x), atol=1e-5)
    with pytest.raises(StepRejected, match="no rows kept"):
        keeper.fill((Segment(1, 0, 8, False, 1),), torch.empty(0), 0, 2)  # its input is the token ids
    with pytest.raises(StepRejected, match="does not continue"):
        keeper.fill((Segment(1, 8, 8, False, 1),), torch.tensor(a[8:16]), 0, 2)  # beyond what the copy holds
    keeper.fill((Segment(1, 0, 48, False, 1), Segment(2, 0, 30, False, 1)), torch.tensor(a + b[:30]), 0, 2)
    assert (keeper.held_first(1), keeper.held_first(2)) == (48, 30)
    redo = (Segment(1, 40, 8, False, 1),)  # request 1's last 8 positions written again: its copy is cut back
    again = first.run(redo, torch.tensor(a[40:]))
    assert torch.allclose(keeper.run(redo, again), middle.run(redo, again), atol=1e-5)
    assert keeper.held_first(1) == 40
    assert not keeper.reshape(0, 6, 0, False)  # not a range its copies make: nothing taken over
    assert keeper.serves(2, 4, 6, True)
    assert keeper.reshape(0, 4, 0, False)
    assert (keeper.loaded.layer_start, keeper.loaded.layer_end) == (0, 4) and keeper.shard.is_first
    assert keeper.copy is None and keeper.first is None and len(keeper.kv.get(1).keys) == 4  # [4, 6)'s freed
    assert keeper.missing == (0, 2) and keeper.unfilled == {1: 40, 2: 30}
    nxt = (Segment(1, 48, 1, False, 1), Segment(2, 41, 1, False, 1))
    with pytest.raises(StepRejected, match="not computed yet"):
        keeper.run(nxt, torch.tensor([5, 6]))
    keeper.fill((Segment(1, 40, 8, False, 1), Segment(2, 30, 11, False, 1)), torch.tensor(a[40:] + b[30:]), 0, 2)
    assert keeper.missing is None and not keeper.unfilled
    want = middle.run(nxt, first.run(nxt, torch.tensor([5, 6])))
    assert torch.allclose(keeper.run(nxt, torch.tensor([5, 6])), want, atol=1e-4)
    # the master's count of a copy may trail the worker's (a copy step answered after the repair): layers
    # taken over from a copy that held every position still take a fill of positions it held
    other = StageRunner(load_shard(ckpt, 0, 4, cpu, torch.float32), 4096, 256, serve_start=2)
    seven = (Segment(7, 0, 48, False, 1),)
    x = first.run(seven, torch.tensor(a))
    assert torch.allclose(other.run(seven, x), middle.run(seven, x), atol=1e-5)
    other.fill(seven, torch.tensor(a), 0, 2)
    assert other.reshape(0, 4, 0, False) and other.missing == (0, 2) and not other.unfilled
    other.fill((Segment(7, 40, 8, False, 1),), torch.tensor(a[40:]), 0, 2)
    assert other.missing is None
    step = (Segment(7, 48, 1, False, 1),)
    want = middle.run(step, first.run(step, torch.tensor([9])))
    assert torch.allclose(other.run(step, torch.tensor([9])), want, atol=1e-4)


def test_an_assign_widens_a_stage_only_over_a_lost_neighbours_layers_never_for_its_copies():
    """A stage of [0, 4) asked to serve [2, 4) with copies of [0, 2) and [4, 6) loads [0, 6), but
    that is a new stage, not [0, 4) widened by [4, 6) (which served [0, 4) as the first stage)."""
    from worker_core.session import _added
    from worker_core.wire import Assign

    def asg(a: int, b: int, copy_end: int = 0, copy_first: bool = False) -> Assign:
        return Assign(1, "m", a, b, 6, 64, 1000, copy_end=copy_end, copy_first=copy_first)

    assert _added(0, 4, asg(0, 6)) == (4, 6) and _added(2, 4, asg(0, 4)) == (0, 2)
    assert _added(0, 4, asg(2, 4, 6, True)) is None and _added(2, 4, asg(2, 4, 6)) is None
    assert _added(2, 4, asg(0, 4, copy_first=False)) == (0, 2) and _added(0, 2, asg(2, 4)) is None


THREE_LAYERS = 98_560 + 3 * 672_256 + 1_000  # bytes: the tiny model's embeddings (or head) and 3 layers with
# their KV reserve (ModelDims.shape of ``ckpt``): a member offering this holds 3 of the 6 layers, not 4


@pytest.mark.parametrize(
    ("lost", "split"), [(0, False), (1, False), (2, False), (1, True)], ids=["first", "middle", "last", "middle-split"]
)
def test_a_lost_stage_without_a_spare_is_taken_over_by_a_neighbour_and_the_others_keep_their_caches(
    ckpt, want, lost, split, monkeypatch
):
    """A stage dies mid-generation and no member stands by: a neighbour takes its layers over
    beside its own (the pipeline has a stage fewer), computes only those layers' positions
    (from the token ids, the rows the stage before it kept, or its own), every stage keeps its
    caches (the same cache objects, the same KV ids) and the tokens are transformers'.
    ``split``: each member's memory holds 3 of the 6 layers, so neither neighbour holds 4: the
    one before takes the lost stage's first layer, the one after its second, and the second's
    fill starts from what the first computed."""
    without_copies(monkeypatch)  # the neighbour computes every position (master_core.copies would hold some)
    memory = [{"memory_limit": THREE_LAYERS} for _ in range(3)] if split else None

    async def main():
        async with Cluster(ckpt, workers=3, min_workers=2, worker_options=memory) as c:
            g, e = c.master.group, c.engine
            await until(lambda: e.profiled, 60, lambda: f"group {g.state.name}")
            gens = [asyncio.create_task(e.generate(p, greedy(NEW))) for p in PROMPTS]
            while e.tokens_generated < 12:
                await asyncio.sleep(0.005)
            before = [(s.name, s.assignment.layer_start, s.assignment.layer_end) for s in g.stages if s.assignment]
            kv_ids = {r.id: r.kv_id for r in e.running.values()}
            caches = {
                (id(s), k): s.runner.kv.get(k)
                for s in _sessions()
                for k in kv_ids.values()
                if s.runner.kv.get(k) and (s.runner.shard.layer_start, s.runner.shard.layer_end) != before[lost][1:]
            }
            gone = g.stages[lost]
            gone.close_with("lost (the test)")
            c.tasks[int(gone.name[1:])].cancel()

            def where() -> str:
                stages = [(s.name, s.state.name) for s in g.stages]
                return f"group {g.state.name} epoch {g.epoch} stages {stages} repairs {g.repairs}"

            await until(lambda: bool(g.serving and len(g.stages) == 2), 60, where, 0.005)
            await until(lambda: e.rebuilt_requests > 0 or e.replays > 0, 60, where, 0.005)
            after = [(s.name, s.assignment.layer_start, s.assignment.layer_end) for s in g.stages if s.assignment]
            still = {key: s.runner.kv.get(key[1]) for s in _sessions() for key in caches if key[0] == id(s)}
            same_ids = {r.id: r.kv_id for r in e.running.values()} == kv_ids
            got = await asyncio.wait_for(asyncio.gather(*gens), 60)
            counts = (g.repairs, e.rebuilt_requests, e.kv.reset_restarts, e.replays)
            kept = sum(still.get(k) is v for k, v in caches.items())
            positions = e.rebuilt_tokens
            e.kv.forget_idle()
            deadline = time.monotonic() + 5
            while any(len(s.runner.kv) for s in _sessions()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            left = [len(s.runner.kv) for s in _sessions()]
            return [r[0] for r in got], before, after, counts, same_ids, kept, positions, left

    got, before, after, counts, same_ids, kept, positions, left = run(main())
    assert got == want
    ranges = [(a, b) for _, a, b in before]
    assert ranges == [(0, 2), (2, 4), (4, 6)], before
    # the neighbour after the first, before the last; either for the middle one (the faster)
    ways = {0: [[(0, 4), (4, 6)]], 1: [[(0, 4), (4, 6)], [(0, 2), (2, 6)]], 2: [[(0, 2), (2, 6)]]}[lost]
    if split:
        ways = [[(0, 3), (3, 6)]]
    assert sorted((a, b) for _, a, b in after) in ways, after
    assert counts == (1, 2, 0, 0), counts
    assert same_ids, "a request was given a new KV id: it was computed again from scratch"
    assert kept == 4, "the surviving stages' cache objects were replaced"  # 2 stages x 2 requests
    # each request's positions once on the widened stage only (split: once on each of the two)
    assert (2 if split else 1) * 89 <= positions <= (2 if split else 1) * (89 + 2 * NEW), positions
    assert left == [0, 0], left


@pytest.mark.parametrize("lost", [0, 1, 2], ids=["first", "middle", "last"])
def test_the_stage_before_a_lost_stage_takes_its_layers_over_from_the_copy_it_kept(ckpt, want, lost, monkeypatch):
    """No member stands by; every stage but the last keeps a copy of the next stage's layers,
    and the second stage one of the first stage's too (master_core.copies), filled in the
    background.  Once the copies hold the prompts, a stage dies: the stage before it (for the
    first, the second stage) serves both ranges, computes only the positions its copy lacked
    (fewer than the prompts), every stage keeps its caches, and the tokens are transformers'."""
    import master_core.copies
    import master_core.group

    monkeypatch.setattr(master_core.copies, "DUTY", 1.0)  # unpaced: a busy machine must not outrun the copies
    monkeypatch.setattr(master_core.group, "REPAIR_SETTLE", 0.5)  # (no member comes back here)
    slow = [{"link_delay_ms": 15} for _ in range(3)]  # so that the copies catch up mid-generation

    async def main():
        async with Cluster(ckpt, workers=3, min_workers=2, worker_options=slow) as c:
            g, e = c.master.group, c.engine
            await until(lambda: e.profiled, 60, lambda: f"group {g.state.name}")
            copies = [(a.copy_first, a.layer_end, a.copy_end) for s in g.stages if (a := s.assignment)]
            gens = [asyncio.create_task(e.generate(p, greedy(NEW))) for p in PROMPTS]
            holder = g.stages[lost - 1 if lost else 1]
            a, b = g.stages[lost].assignment.layer_start, g.stages[lost].assignment.layer_end

            def caught_up() -> bool:  # the copy of the layers to be lost holds the prompts
                assert e.tokens_generated < len(PROMPTS) * NEW - 4, "the requests ended before the copies caught up"
                held = e.copies.holding(holder, (a, b))
                return e.tokens_generated >= 8 and all(
                    held.get(r.kv_id, 0) >= len(r.prompt) for r in e.running.values()
                )

            await until(caught_up, 60, lambda: f"behind {e.copies.behind()}", 0.005)
            kv_ids = {r.id: r.kv_id for r in e.running.values()}
            gone = g.stages[lost]
            gone.close_with("lost (the test)")
            c.tasks[int(gone.name[1:])].cancel()
            await until(lambda: bool(g.serving and len(g.stages) == 2), 60, lambda: f"group {g.state.name}", 0.005)
            repaired = g.epoch
            await until(lambda: e.rebuilt_requests > 0 or e.replays > 0, 60, lambda: "no rebuild", 0.005)
            after = [(s.name, s.assignment.layer_start, s.assignment.layer_end) for s in g.stages if s.assignment]
            same_ids = {r.id: r.kv_id for r in e.running.values()} == kv_ids
            runners = [s.runner for s in _sessions()]  # the repaired stages (planned again once idle, below)
            # the epoch as each request ends: the re-plan once idle may come before this task runs again
            ended_in: list[int] = []
            e.on_finish(lambda _: ended_in.append(g.epoch))
            got = await asyncio.wait_for(asyncio.gather(*gens), 60)
            assert max(ended_in) == repaired, "the repaired pipeline was planned again while its requests ran"
            counts = (g.repairs, e.rebuilt_requests, e.kv.reset_restarts, e.replays)
            held, rebuilt = e.rebuilt_held, e.rebuilt_tokens
            e.kv.forget_idle()
            deadline = time.monotonic() + 5
            while any(len(r.kv) for r in runners) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            left = [len(r.kv) for r in runners]
            # no request runs: the two members are planned whole again, each keeping a copy of the
            # other's layers (a repair adds none)
            await until(lambda: g.serving and g.epoch > repaired, 60, lambda: f"group {g.state.name}")
            idle = [(a.layer_start, a.layer_end, a.copy_end, a.copy_first) for s in g.stages if (a := s.assignment)]
            # a new member joins: the group is planned whole again, with copies, from what the
            # members hold (a stage that took a copy over may become one that keeps copies)
            epoch = g.epoch
            c.add_worker("w3", link_delay_ms=15)
            await until(lambda: g.serving and len(g.stages) == 3 and g.epoch > epoch, 60, lambda: g.state.name)
            await until(lambda: e.profiled, 60, lambda: "not profiled")
            again = await asyncio.wait_for(asyncio.gather(*(e.generate(p, greedy(NEW)) for p in PROMPTS)), 60)
            got = [r[0] for r in got] + [r[0] for r in again]
            return got, copies, holder.name, after, counts, same_ids, held, rebuilt, left, idle

    got, copies, holder, after, counts, same_ids, held, rebuilt, left, idle = run(main())
    assert got == want + want
    middle = idle[0][1]
    assert idle == [(0, middle, 6, False), (middle, 6, 0, True)], idle
    # each stage but the last copies the next one, and the second the first
    assert copies == [(False, 2, 4), (True, 4, 6), (False, 6, 0)], copies
    wide = (0, 4) if lost < 2 else (2, 6)
    assert (holder, *wide) in after, after
    assert counts == (1, 2, 0, 0), counts
    assert same_ids, "a request was given a new KV id: it was computed again from scratch"
    assert held >= 89 and rebuilt < 89, (held, rebuilt)  # the copy held the prompts: only the rest is computed
    assert left == [0, 0], left


def test_a_standby_too_small_for_the_whole_model_keeps_the_span_of_stages_with_the_most_weights():
    """The span of consecutive stage ranges its memory holds as a stage of that span (with the
    embeddings or the head at an end of the model), of the most bytes of weights: not the most
    layers, not a range a neighbour could not take over; the first of equals."""
    from master_core.placement import Member, ModelShape, standby_range

    shape = ModelShape(num_layers=10, layer_bytes=100, first_bytes=500, last_bytes=500, kv_bytes_per_layer=10)
    ranges = [(0, 3), (3, 5), (5, 8), (8, 10)]

    def kept(memory: int, taken: list[tuple[int, int]] | None = None) -> tuple[int, int] | None:
        return standby_range(shape, ranges, Member(str(memory), memory, 1.0), taken or [])

    assert kept(5 * 110) == (3, 8)  # 5 middle layers: two stages' ranges, the most it holds
    assert kept(500 + 2 * 110) == (8, 10)  # 2 layers and the head (700 bytes) before 5 middle layers (500)
    assert kept(500 + 3 * 110) == (0, 3)  # 3 layers and the embeddings (800) before 2 and the head (700)
    assert kept(500 + 5 * 110) == (0, 5)  # (0, 5) and (5, 10) weigh 1000 each: the first
    assert kept(500 + 5 * 110, [(0, 5)]) == (5, 10)  # another standby member keeps (0, 5)
    assert kept(500 + 7 * 110) == (3, 10)  # 7 layers and the head: 1200 bytes
    assert kept(500 + 7 * 110 - 1) == (0, 5)  # one byte short of (3, 10) with its layers' KV reserve
    assert kept(1000 + 10 * 110) == (0, 10)  # every stage
    assert kept(2 * 110 - 1) is None  # not even the shortest stage's 2 layers


FOUR_LAYERS = THREE_LAYERS + 672_256  # the embeddings (or head) and 4 of the 6 layers with their KV reserve


def test_a_lost_stage_is_carved_out_of_the_span_a_standby_kept_loaded(ckpt, want):
    """No member's memory holds the whole model; the member standing by holds 4 of the 6 layers
    beside the embeddings or the head, so it keeps the first two stages' ranges loaded, [0, 4).
    When the middle stage dies the repair gives it [2, 4), which it takes out of that span: the
    same layer objects, nothing read, no embeddings kept; only the lost stage's positions are
    computed, the others keep their caches, and the tokens are transformers'."""
    three, four = {"memory_limit": THREE_LAYERS}, {"memory_limit": FOUR_LAYERS}

    async def main():
        async with Cluster(ckpt, workers=3, min_workers=3, worker_options=[three] * 3) as c:
            g, e = c.master.group, c.engine
            c.add_worker("spare", link_delay_ms=20, **four)  # a slower link: it stands by

            def where() -> str:
                names = [(x.name, x.assignment and (x.assignment.layer_start, x.assignment.layer_end)) for x in g.links]
                return f"group {g.state.name} epoch {g.epoch} stages {[s.name for s in g.stages]} links {names}"

            def preloaded() -> bool:
                spare = next((x for x in g.links if x.name == "spare"), None)
                a = spare.assignment if spare is not None and not spare.loading else None
                return g.serving and a is not None and (a.layer_start, a.layer_end) == (0, 4)

            await until(preloaded, 60, where)
            await until(lambda: e.profiled, 60, where)
            ranges = [(s.assignment.layer_start, s.assignment.layer_end) for s in g.stages if s.assignment]
            held = next(s for s in _sessions() if s.config.name == "spare").runner.shard
            gens = [asyncio.create_task(e.generate(p, greedy(NEW))) for p in PROMPTS]
            while e.tokens_generated < 12:
                await asyncio.sleep(0.005)
            gone = g.stages[1]
            gone.close_with("lost (the test)")
            c.tasks[int(gone.name[1:])].cancel()
            await until(lambda: bool(g.serving and len(g.stages) == 3 and g.stages[1].name == "spare"), 60, where)
            await until(lambda: e.rebuilt_requests > 0 or e.replays > 0, 60, where, 0.005)
            session = next(s for s in _sessions() if s.config.name == "spare")
            took, loaded = session.runner.shard, list(session.shards.values())
            got = await asyncio.wait_for(asyncio.gather(*gens), 60)
            counts = (g.repairs, e.rebuilt_requests, e.kv.reset_restarts, e.replays)
            return [r[0] for r in got], ranges, held, took, loaded, counts, e.rebuilt_tokens

    got, ranges, held, took, loaded, counts, positions = run(main())
    assert got == want
    assert ranges == [(0, 2), (2, 4), (4, 6)], ranges
    assert (took.layer_start, took.layer_end) == (2, 4)
    assert [id(x) for x in took.layers] == [id(x) for x in held.layers[2:4]], "it read the layers again"
    assert took.embed is None and loaded == [took], "the embeddings of the span stayed loaded"
    assert counts == (1, 2, 0, 0), counts
    assert 89 <= positions <= 89 + 2 * NEW, positions  # the lost stage's positions, once


def test_a_newcomers_re_plan_narrows_the_old_stages_out_of_the_layers_they_hold(ckpt, want):
    """A third member joins a pipeline of two: each old member's new, narrower range is carved
    out of its old one (the same layer objects, nothing read again, no caches carried), and the
    tokens are transformers'."""

    async def main():
        async with Cluster(ckpt, workers=2) as c:
            g, e = c.master.group, c.engine
            await until(lambda: e.profiled, 60, lambda: f"group {g.state.name}")
            before = {s.config.name: s.runner.shard for s in _sessions()}
            first = (await e.generate(PROMPTS[0], greedy(NEW)))[0]
            kept = {s.config.name: len(s.runner.kv) for s in _sessions()}  # its caches, kept for reuse
            c.add_worker("w2")

            def where() -> str:
                names = [(x.name, x.assignment and (x.assignment.layer_start, x.assignment.layer_end)) for x in g.links]
                return f"group {g.state.name} epoch {g.epoch} links {names}"

            await until(lambda: g.serving and len(g.stages) == 3, 60, where)
            after = {s.config.name: s.runner for s in _sessions()}
            # (the new pipeline's start-up profile, which may be on its way already, is no carried cache)
            caches = {name: sum(k != PROFILE_REQUEST_ID for k, _ in r.kv.items()) for name, r in after.items()}
            got = [(await e.generate(p, greedy(NEW)))[0] for p in PROMPTS]
            return first, got, before, {name: r.shard for name, r in after.items()}, (kept, caches)

    first, got, before, after, (kept, caches) = run(main())
    assert [first, *got] == [want[0], *want]
    assert sorted((s.layer_start, s.layer_end) for s in before.values()) == [(0, 3), (3, 6)]
    assert sorted((s.layer_start, s.layer_end) for s in after.values()) == [(0, 2), (2, 4), (4, 6)]
    for name, old in before.items():
        new = after[name]
        assert old.layer_start <= new.layer_start and new.layer_end <= old.layer_end, (name, old, new)
        lo = new.layer_start - old.layer_start
        assert [id(x) for x in new.layers] == [id(x) for x in old.layers[lo : lo + len(new.layers)]], name
        assert (new.embed is old.embed) if new.layer_start == 0 else new.embed is None
    assert kept == {"w0": 1, "w1": 1} and caches == {"w0": 0, "w1": 0, "w2": 0}, (kept, caches)  # none carried


@pytest.mark.parametrize("spare", ["neighbour", "spare", "copied"])
def test_conversation_turns_started_from_a_cached_prefix_survive_a_repair_with_their_prefix(ckpt, spare, monkeypatch):
    """Two requests continue a conversation from its cached history (a prefix held on every
    stage); the middle stage dies.  The repair keeps them and that prefix: the stage that takes
    the layers (a neighbour widened, or a spare) computes the prefix's positions and then each
    request's own, none starts again, and the tokens are transformers'.  ``copied``: the spare
    copied the prefix and the requests while it stood by (the stages' links slowed so that it
    has the time), and computes only what it lacks."""
    from master_core.group import Group

    if spare != "copied":
        monkeypatch.setattr(Group, "shadow_target", lambda self: None)  # no copy: the spare computes it all
    if spare != "copied":  # nor does a stage keep a copy of the next one's layers (it would take the range)
        without_copies(monkeypatch)
    slow = [{"link_delay_ms": 15} for _ in range(3)] if spare == "copied" else None
    first = PROMPTS[0]

    async def main():
        async with Cluster(ckpt, workers=3, min_workers=2, worker_options=slow) as c:
            g, e = c.master.group, c.engine
            if spare != "neighbour":
                c.add_worker("spare", link_delay_ms=80 if slow else 20)
                await until(lambda: len(g.links) == 4 and "spare" in g.standby and g.serving, 60, lambda: g.standby)
            await until(lambda: e.profiled, 60, lambda: f"group {g.state.name}")
            answer = (await e.generate(first, greedy(8)))[0]
            history = first + answer
            prompts = [history + list(range(140, 149)), history + list(range(160, 171))]
            reqs = [e.submit(p, greedy(NEW)) for p in prompts]
            while e.tokens_generated < 8 + 12:
                await asyncio.sleep(0.005)
            if spare == "copied":  # the history once, then both requests' own prompts
                want = 48 + sum(len(p) - 48 for p in prompts)
                await until(lambda: e.shadow.copied >= want, 60, lambda: f"{e.shadow.describe()}, {e.shadow.copied}")
                assert not all(r.finished for r in reqs), "the requests ended before the spare copied"
            cached = [r.cached_tokens for r in reqs]
            kv_ids = {r.id: r.kv_id for r in e.running.values()}
            gone = g.stages[1]
            gone.close_with("lost (the test)")
            c.tasks[int(gone.name[1:])].cancel()

            def where() -> str:
                return f"group {g.state.name} epoch {g.epoch} stages {[s.name for s in g.stages]} repairs {g.repairs}"

            await until(lambda: g.serving and g.repairs == 1, 60, where, 0.005)
            await until(lambda: e.rebuilt_requests > 0 or e.replays > 0, 60, where, 0.005)
            same_ids = {r.id: r.kv_id for r in e.running.values()} == kv_ids
            while not all(r.finished for r in reqs):
                await asyncio.sleep(0.01)
            counts = (e.rebuilt_requests, e.kv.reset_restarts, e.replays)
            computed = e.rebuilt_tokens + e.rebuilt_held
            return (
                prompts,
                [list(r.output) for r in reqs],
                cached,
                counts,
                same_ids,
                computed,
                len(g.stages),
                e.rebuilt_held,
            )

    prompts, got, cached, counts, same_ids, positions, stages, held = run(main())
    assert got == [reference_greedy(ckpt, p, NEW) for p in prompts]
    assert all(n >= 48 for n in cached), cached  # they started from the cached history
    assert counts == (2, 0, 0), counts
    assert same_ids, "a request was given a new KV id: it was computed again from scratch"
    assert stages == (2 if spare == "neighbour" else 3)
    # the prefix's positions once, then each request's own (computed at the repair or copied
    # before it): nowhere near the prompts twice over
    assert 48 + sum(len(p) - 48 for p in prompts) <= positions < sum(map(len, prompts)) + 2 * NEW, positions
    assert held >= 48 + sum(len(p) - 48 for p in prompts) if spare == "copied" else held == 0, held
