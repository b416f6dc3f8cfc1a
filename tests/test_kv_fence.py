"""A stage's KV fence and shared prefixes (worker_core.stage, worker_core.kv_cache): a segment
may start anywhere within its cache (truncate, then write), a late step of an older generation
is refused and changes nothing, and a request started from another's cached prefix computes
exactly what it would from scratch while the prefix counts once."""

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from worker_core.shard import load_shard
from worker_core.stage import StageRunner, StepRejected
from worker_core.wire import ProtocolError, Segment, Step, decode, encode

CPU = torch.device("cpu")
A = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
B = [40, 41, 42]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("fence") / "llama", num_layers=2, seed=5)
    return load_shard(path, 0, 2, CPU, torch.float32)  # the whole model: ids in, logits out


def _logits(runner: StageRunner, seg: Segment, ids: list[int]) -> torch.Tensor:
    return runner.run((seg,), torch.tensor(ids, dtype=torch.int64))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same logits up to float rounding (packing changes the matmul shapes), same argmax."""
    return torch.allclose(a, b, atol=1e-5) and torch.equal(a.argmax(-1), b.argmax(-1))


def _scratch(shard, ids: list[int]) -> torch.Tensor:
    return _logits(StageRunner(shard, 1024, 256), Segment(1, 0, len(ids), True, 1), ids)


def test_a_start_within_the_cache_truncates_then_writes(shard):
    r = StageRunner(shard, 1024, 256)
    _logits(r, Segment(1, 0, len(A), True, 1), A)
    got = _logits(r, Segment(1, 6, len(B), True, 1), B)  # positions 6.. rewritten: A[:6] + B
    assert r.kv.length(1) == 6 + len(B) and r.kv.used_tokens == 6 + len(B)
    assert _same(got, _scratch(shard, A[:6] + B))
    with pytest.raises(StepRejected, match="holds 9 tokens"):  # beyond the cache: refused
        _logits(r, Segment(1, 10, 1, True, 1), [3])


def test_a_late_step_of_an_older_generation_is_refused_and_changes_nothing(shard):
    r = StageRunner(shard, 1024, 256)
    _logits(r, Segment(1, 0, len(A), True, 1), A)
    _logits(r, Segment(1, 8, 1, True, 2), [A[8]])  # the master gave up on generation 1's steps
    before = r.kv.length(1)
    for late in (Segment(1, 9, 1, True, 1), Segment(1, 3, 2, True, 1), Segment(1, 0, 2, True, 1)):
        with pytest.raises(StepRejected, match="late step of generation 1"):
            _logits(r, late, [3] * late.length)
        assert r.kv.length(1) == before and r.kv.get(1).generation == 2
    got = _logits(r, Segment(1, 9, 1, True, 2), [A[9]])  # generation 2 goes on
    assert _same(got, _scratch(shard, A))


def test_a_cached_prefix_is_shared_counted_once_and_never_written_again(shard):
    r = StageRunner(shard, 1024, 256)
    _logits(r, Segment(1, 0, len(A), True, 1), A)
    got = _logits(r, Segment(2, 8, len(B), True, 1, base=1), B)  # request 2 = A[:8] + B
    assert _same(got, _scratch(shard, A[:8] + B))
    assert r.kv.used_tokens == len(A) + len(B)  # the 8 shared tokens count once
    nxt = _logits(r, Segment(2, 8 + len(B), 1, True, 1), [50])  # and it decodes on
    assert _same(nxt, _scratch(shard, A[:8] + B + [50]))
    with pytest.raises(StepRejected, match="write over a prefix"):  # the holder cannot rewrite what is shared
        _logits(r, Segment(1, 4, 1, True, 1), [3])
    _logits(r, Segment(1, 8, 1, True, 1), [3])  # beyond the shared part: it may
    r.free((1,))  # the holder's id is dropped; request 2's view of its prefix stays intact
    again = _logits(r, Segment(2, 8 + len(B) + 1, 1, True, 1), [51])
    assert _same(again, _scratch(shard, A[:8] + B + [50, 51]))
    with pytest.raises(StepRejected, match="cached prefix 1"):  # a prefix that is not here
        _logits(r, Segment(3, 4, 1, True, 1, base=1), [3])
    with pytest.raises(StepRejected, match="cached prefix 2"):  # longer than the prefix holds
        _logits(r, Segment(3, 40, 1, True, 1, base=2), [3])


def test_a_budget_counts_truncation_and_drop_frees_first(shard):
    r = StageRunner(shard, 12, 256)
    _logits(r, Segment(1, 0, len(A), True, 1), A)
    _logits(r, Segment(1, 5, 7, True, 1), [3] * 7)  # 5 kept + 7 = 12: fits after truncation
    with pytest.raises(StepRejected, match="KV budget"):
        _logits(r, Segment(2, 0, 2, True, 1), [3, 4])
    out = r.run((Segment(2, 0, 2, True, 1),), torch.tensor([3, 4]), drop=(1,))
    assert out.shape[0] == 1 and r.kv.used_tokens == 2 and r.kv.get(1) is None


def test_wire_carries_generation_base_and_drop_and_checks_them():
    seg = Segment(7, 16, 3, True, generation=4, base=5)
    step = Step(1, 2, (seg, Segment(8, 0, 1, False)), torch.zeros(4, dtype=torch.int64), drop=(3, 9))
    back = decode(encode(step))
    assert isinstance(back, Step) and back.segments == step.segments and back.drop == (3, 9)
    plain = decode(encode(Step(1, 2, (Segment(8, 0, 1, False),), torch.zeros(1, dtype=torch.int64))))
    assert isinstance(plain, Step) and plain.segments[0].generation == 0 and plain.drop == ()
    for bad in (
        Step(1, 2, (Segment(7, 0, 3, True, base=5),), torch.zeros(3, dtype=torch.int64)),  # a prefix of 0 tokens
        Step(1, 2, (Segment(7, 4, 3, True, base=7),), torch.zeros(3, dtype=torch.int64)),  # its own prefix
        Step(1, 2, (Segment(7, 4, 3, True, generation=-1),), torch.zeros(3, dtype=torch.int64)),
        Step(1, 2, (Segment(7, 4, 3, True),), torch.zeros(3, dtype=torch.int64), drop=(-2,)),
    ):
        with pytest.raises(ProtocolError):
            decode(encode(bad))


def test_a_stage_keeps_what_it_sent_on_and_gives_it_back_for_a_rebuild(tmp_path):
    """A stage that is not the last keeps its output rows (truncated and rewritten like its KV,
    shared with a cached prefix) and ``recall`` returns exactly them; the next stage rebuilt
    from them computes what it computed from the original rows."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama", num_layers=2, seed=5)
    first = StageRunner(load_shard(path, 0, 1, CPU, torch.float32), 1024, 256)
    last = load_shard(path, 1, 2, CPU, torch.float32)
    out = first.run((Segment(1, 0, len(A), False, 1),), torch.tensor(A))
    assert torch.equal(first.recall((Segment(1, 0, len(A), False),)), out)
    again = first.run((Segment(1, 4, 3, False, 2),), torch.tensor([50, 51, 52]))  # truncated at 4, rewritten
    got = first.recall((Segment(1, 2, 5, False),))
    assert torch.equal(got[:2], out[2:4]) and torch.equal(got[2:], again)
    shared = first.run((Segment(2, 4, 2, False, 1, base=1),), torch.tensor([60, 61]))  # starts from 1's prefix
    both = first.recall((Segment(2, 0, 6, False), Segment(1, 0, 1, False)))
    assert torch.equal(both[:4], out[:4]) and torch.equal(both[4:6], shared) and torch.equal(both[6:], out[:1])
    with pytest.raises(StepRejected, match="cannot recall"):
        first.recall((Segment(1, 0, 8, False),))  # it holds 7
    with pytest.raises(StepRejected, match="cannot recall"):
        first.recall((Segment(9, 0, 1, False),))
    with pytest.raises(StepRejected, match="last stage"):
        StageRunner(last, 1024, 256).recall((Segment(1, 0, 1, False),))
    # the next stage, rebuilt from the recalled rows, gives the logits it gave from the originals
    sent = first.run((Segment(3, 0, len(A), False, 1),), torch.tensor(A))
    original, rebuilt = StageRunner(last, 1024, 256), StageRunner(last, 1024, 256)
    a = original.run((Segment(3, 0, len(A), True, 1),), sent)
    b = rebuilt.run((Segment(3, 0, len(A), True, 1),), first.recall((Segment(3, 0, len(A), False),)))
    assert torch.equal(a, b)
