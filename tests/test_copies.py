"""The master's side of the copies a stage keeps of the next stage's layers (master_core.copies):
what it decides, and what it sends."""

import asyncio
from types import SimpleNamespace

import torch

from master_core import copies
from master_core.copies import Copies, copy_ends
from master_core.prefix_cache import Entry
from worker_core.wire import Assign, Result


def _assign(start: int, end: int, copy_end: int = 0, copy_first: bool = False) -> Assign:
    return Assign(1, "m", start, end, 6, 64, 1000, copy_end=copy_end, copy_first=copy_first)


class _Link:
    def __init__(self, name: str, asg: Assign) -> None:
        self.name, self.assignment, self.sent, self.fills = name, asg, [], []

    async def background(self, fill, timeout):
        self.sent.append([(s.request_id, s.start, s.length) for s in fill.segments])
        self.fills.append(fill)
        return Result(fill.step_id, fill.epoch, 0.0, 0.0, torch.empty(0))


def test_a_copy_is_filled_once_a_cached_prefix_first_and_a_finished_prefix_is_not_copied_again(monkeypatch):
    """A request starting from a cached prefix: the copy holds the prefix's positions, then the
    request's own, in steps of at most 64; once it holds them all it sends nothing more (the
    prefix, copied whole, is still counted as held, not copied again).  Once the request ended,
    its copy is still counted while its cache is a cached prefix."""
    monkeypatch.setattr(copies, "FOLLOW", 0.0)
    monkeypatch.setattr(copies, "STEP_TOKENS", 64)
    link = _Link("w0", _assign(0, 2, 4))
    group = SimpleNamespace(serving=True, stages=[link, _Link("w1", _assign(2, 4))])
    prefix = Entry(kv_id=7, tokens=tuple(range(100)), base=None, base_len=0, held=100)
    req = SimpleNamespace(
        kv_id=9, kv_gen=0, computed=130, tokens=list(range(130)), prompt=[0] * 120, prefix=prefix, base_len=100, order=1
    )
    running = [req]
    c = Copies(group, lambda: running, iter(range(1, 100)), lambda kv_id: kv_id == 9)  # type: ignore[arg-type]

    async def steps() -> list[bool]:
        return [await c._step(link, link.assignment, False) for _ in range(6)]  # type: ignore[arg-type]

    sent = asyncio.run(steps())
    assert sent == [True, True, True, False, False, False], sent
    assert link.sent == [[(7, 0, 64)], [(7, 64, 36)], [(9, 100, 30)]], link.sent
    assert c.behind() == {"w0 [2, 4)": 0} and c.copied == 130
    running.clear()  # the request ended; its cache is kept as a cached prefix (9), its prefix is not (7)
    assert asyncio.run(steps()) == [False] * 6
    assert c._held[(link, False)][1] == {9: 130}  # type: ignore[index]


def test_the_second_stage_copies_the_first_from_the_token_ids_beside_its_copy_of_the_next(monkeypatch):
    """A stage that keeps both copies is sent steps of both: the first stage's layers with the
    positions' token ids (that stage's input), the next stage's from the rows it kept (no tensor).
    ``behind`` counts what both lack; ``take`` hands over each copy's counts for its own layers."""
    monkeypatch.setattr(copies, "FOLLOW", 0.0)
    link = _Link("w1", _assign(2, 4, 6, copy_first=True))
    group = SimpleNamespace(serving=True, stages=[_Link("w0", _assign(0, 2)), link, _Link("w2", _assign(4, 6))])
    tokens = list(range(100, 140))
    req = SimpleNamespace(
        kv_id=9, kv_gen=0, computed=40, tokens=tokens, prompt=tokens, prefix=None, base_len=0, order=1
    )
    c = Copies(group, lambda: [req], iter(range(1, 100)))  # type: ignore[arg-type]
    assert [(x.name, first) for x, _, first in c.holders()] == [("w1", True), ("w1", False)]
    assert c.behind() == {"w1 [0, 2)": 40, "w1 [4, 6)": 40}

    async def steps() -> list[bool]:
        return [await c._step(link, link.assignment, first) for first in (True, True, False, False)]  # type: ignore[arg-type]

    assert asyncio.run(steps()) == [True, True, True, True]
    assert [(f.layer_start, f.layer_end) for f in link.fills] == [(0, 2), (0, 2), (4, 6), (4, 6)]
    assert link.fills[0].tensor.tolist() == tokens[:32] and link.fills[1].tensor.tolist() == tokens[32:]
    assert link.fills[2].tensor.numel() == 0 and link.sent[2:] == [[(9, 0, 32)], [(9, 32, 8)]]
    assert c.behind() == {"w1 [0, 2)": 0, "w1 [4, 6)": 0}
    c.handover()  # another stage was repaired: this one keeps its range and its copies, and their counts
    link.assignment = _assign(2, 4, 6, copy_first=True)
    assert c.behind() == {"w1 [0, 2)": 0, "w1 [4, 6)": 0}
    assert asyncio.run(c._step(link, link.assignment, True)) is False  # type: ignore[arg-type]  # nothing to copy
    c.handover()
    assert c.take(link, (0, 2)) == {9: 40} and c.take(link, (4, 6)) == {9: 40}  # type: ignore[arg-type]
    assert c.take(link, (0, 2)) == {}  # type: ignore[arg-type]  # once
    c.handover()  # its range changed: its copy starts over
    link.assignment = _assign(2, 5, 0, copy_first=True)
    assert asyncio.run(c._step(link, link.assignment, True)) is True  # type: ignore[arg-type]
    assert c.behind() == {"w1 [0, 2)": 8} and link.sent[-1] == [(9, 0, 32)]


def test_each_stage_but_the_last_copies_the_next_where_its_budget_stays_the_groups():
    """A whole plan: a stage copies the next one where its KV budget with the copy is at least
    the smallest budget of the stages without copies.  A repair keeps a copy only where the
    stage's range and the next one's are as they were, and adds none."""
    budgets = {("a", 0, 2, 0): 100, ("a", 0, 2, 4): 60, ("b", 2, 4, 0): 50, ("b", 2, 4, 6): 40, ("c", 4, 6, 0): 80}
    firsts = {("b", 2, 4, 0): 55}  # with a copy of the first stage's layers too

    def kv_budget(link: str, a: int, b: int, end: int = 0, first: bool = False) -> int:
        return (firsts if first else budgets)[(link, a, b, end)]

    group = SimpleNamespace(kv_budget=kv_budget)
    plan = [("a", (0, 2)), ("b", (2, 4)), ("c", (4, 6))]
    # b's copy of c would cost it 10; its copy of a, 5 of the group's least (50)
    assert copy_ends(group, plan, None) == [(4, False), (0, True), (0, False)]  # type: ignore[arg-type]
    before = {"a": _assign(0, 2, 4), "b": _assign(2, 4, 6, copy_first=True)}
    assert copy_ends(group, plan, before) == [(4, False), (6, True), (0, False)]  # type: ignore[arg-type]  # as they were
    widened = [("a", (0, 2)), ("b", (2, 6))]  # c was lost: b took its layers over
    assert copy_ends(group, widened, before) == [(0, False), (0, False)]  # type: ignore[arg-type]  # a's next range changed
    widened = [("b", (0, 4)), ("c", (4, 6))]  # a was lost: b took its layers over
    assert copy_ends(group, widened, before | {"c": _assign(4, 6)}) == [(0, False), (0, False)]  # type: ignore[arg-type]


def test_while_a_prompt_is_computed_a_stage_is_sent_a_copy_step_only_now_and_then(monkeypatch):
    """A request whose prompt is not all computed yet: the copy's steps wait ``PROMPTS_FIRST``
    seconds after the last (the prompt's chunks and the streams' steps come first)."""
    monkeypatch.setattr(copies, "FOLLOW", 0.0)
    monkeypatch.setattr(copies, "STEP_TOKENS", 64)
    link = _Link("w0", _assign(0, 2, 4))
    group = SimpleNamespace(serving=True, stages=[link, _Link("w1", _assign(2, 4))])
    tokens = list(range(300))
    req = SimpleNamespace(
        kv_id=9, kv_gen=0, computed=200, tokens=tokens, prompt=tokens, prefix=None, base_len=0, order=1
    )
    c = Copies(group, lambda: [req], iter(range(1, 100)))  # type: ignore[arg-type]

    async def steps() -> list[bool]:
        return [await c._step(link, link.assignment, False) for _ in range(3)]  # type: ignore[arg-type]

    assert asyncio.run(steps()) == [True, False, False]
    req.computed = 300  # its prompt is computed: the copy goes on at once
    assert asyncio.run(steps()) == [True, True, True]
