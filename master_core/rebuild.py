"""Rebuild the KV of one replaced or widened stage from what the stage before it (or itself) kept.

Contract
--------
When one stage of a serving pipeline is lost and a standby member takes over exactly its layer
range (:class:`~master_core.group.Group`), every other stage still holds its requests' caches.
``await rebuild_stage(stages, epoch, index, work, step_ids, max_tokens, hidden_size)`` fills the new stage
``stages[index]`` with the positions ``[start, upto)`` of each :class:`Lost` request, under the KV id
and generation it names (``start`` > 0: what the new stage computed while it stood by,
:mod:`master_core.shadow`), and computes nothing anywhere else: its inputs are the token ids
(``index`` 0, sent from here) or the hidden states ``stages[index - 1]`` kept when it sent them
on (``wire.Recall``).  The work goes in steps of at most ``max_tokens`` tokens, a request's
positions in order and in as few steps as fit; the new stage's outputs are dropped (the stages
after it hold those positions already).  Returns the positions rebuilt.

Raises what :meth:`~master_core.link.WorkerLink.call` raises (``LinkGone``, ``StepFailed``) or
``ProtocolError`` when a stage answers with the wrong shape; nothing is retried here (the
engine then computes the requests from scratch).  Every wait is bounded by the links' step
deadlines.

With ``layers`` it does the same for a stage that took over a lost neighbour's ``layers``
beside its own (the group's repair where no standby member holds the lost range): it computes
only those layers' positions (``wire.Fill``), from the token ids (the layers start the model),
from the rows the stage before kept (they start the stage), or from the rows the stage itself
kept leaving its old end (they end it).  Where two neighbours split the lost layers, the one
before fills first: the one after then recalls the rows leaving its new end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from worker_core.wire import CloseCode, Fill, ProtocolError, Recall, Segment, Step

from .link import WorkerLink
from .prefix_cache import Entry
from .request import Request


@dataclass(frozen=True)
class Lost:
    """A request whose cache the new stage must hold: KV id, generation, positions ``[0, upto)``
    of which it lacks ``[start, upto)``, and its token ids (at least ``upto`` of them)."""

    kv_id: int
    generation: int
    upto: int
    tokens: Sequence[int]
    start: int = 0
    base: int = 0  # its first ``base_len`` positions are this cached prefix's (rebuilt before it)
    base_len: int = 0


def work_of(requests: Iterable[Request], held: Mapping[int, int]) -> list[Lost]:
    """What a stage must hold for ``requests``: first the cached prefixes they start from, each
    before those starting from it and up to the longest part of it in use, then each request's
    positions up to ``computed``; ``held``: positions of each KV id the stage holds already."""
    reqs = list(requests)
    need: dict[int, tuple[Entry, int]] = {}
    for r in reqs:
        e, upto = r.prefix, r.base_len
        while e is not None and upto > need.get(e.kv_id, (e, 0))[1]:
            need[e.kv_id] = (e, upto)
            e, upto = e.base, e.base_len

    def lost(kv: int, gen: int, upto: int, tokens: Sequence[int], base: Entry | None, base_len: int) -> Lost:
        start = max(base_len, min(held.get(kv, 0), upto))
        return Lost(kv, gen, upto, tokens, start, base.kv_id if base is not None else 0, base_len)

    entries = sorted(need.values(), key=lambda x: _depth(x[0]))
    return [lost(e.kv_id, e.generation, upto, e.tokens, e.base, e.base_len) for e, upto in entries] + [
        lost(r.kv_id, r.kv_gen, r.computed, r.tokens, r.prefix, r.base_len) for r in reqs
    ]


def _depth(e: Entry) -> int:
    n, link = 0, e.base
    while link is not None:
        n, link = n + 1, link.base
    return n


def token_ids(segments: Sequence[Segment], work: Sequence[Lost]) -> torch.Tensor:
    """The token ids of ``segments`` (steps of :func:`pack` over ``work``), packed: a first stage's input."""
    by_id = {lost.kv_id: lost for lost in work}
    ids = [t for s in segments for t in by_id[s.request_id].tokens[s.start : s.start + s.length]]
    return torch.tensor(ids, dtype=torch.int64)


def pack(work: Sequence[Lost], max_tokens: int, bases: bool = True) -> list[tuple[Segment, ...]]:
    """The rebuild's steps: each request's positions in order, split where a step is full, at
    most ``max_tokens`` tokens a step, a request at most once per step; with ``bases`` a
    request's first segment at its cached prefix's end names that prefix (a new cache there).
    A request starting from a prefix goes in a later step than that prefix's positions."""
    steps: list[tuple[Segment, ...]] = []
    current: list[Segment] = []
    room = max_tokens
    for lost in work:
        at = lost.start
        if lost.base and current and any(s.request_id == lost.base for s in current):
            steps.append(tuple(current))
            current, room = [], max_tokens
        while at < lost.upto:
            n = min(room, lost.upto - at)
            base = lost.base if bases and lost.base and at == lost.base_len else 0
            current.append(Segment(lost.kv_id, at, n, False, lost.generation, base))
            at += n
            room -= n
            if room == 0:
                steps.append(tuple(current))
                current, room = [], max_tokens
    if current:
        steps.append(tuple(current))
    return steps


def first_step(work: Sequence[Lost], size: int, wait: bool, bases: bool = True) -> tuple[Segment, ...] | None:
    """A background copy's next step (:func:`pack` of ``work`` in steps of ``size``): the first,
    or None where there is none, or only one short of ``size`` while ``wait`` (more positions may
    come: a step of several costs less a position)."""
    steps = pack(work, size, bases)
    if not steps or (len(steps) == 1 and sum(s.length for s in steps[0]) < size and wait):
        return None
    return steps[0]


async def rebuild_stage(
    stages: Sequence[WorkerLink],
    epoch: int,
    index: int,
    work: Sequence[Lost],
    step_ids: Iterator[int],
    max_tokens: int,
    hidden_size: int,
    layers: tuple[int, int] | None = None,
) -> int:
    target = stages[index]
    asg = target.assignment
    own_rows = layers is not None and asg is not None and layers[0] > asg.layer_start  # they follow its own
    rebuilt = 0
    for segments in pack([w for w in work if w.upto > w.start], max_tokens, bases=layers is None):
        if own_rows:
            x = torch.empty(0, hidden_size)
        else:
            x = await _inputs(stages, epoch, index, segments, work, step_ids, hidden_size)
        if layers is None:
            await target.call(Step(next(step_ids), epoch, segments, x))
        else:
            await target.fill(Fill(next(step_ids), epoch, segments, *layers, x))
        rebuilt += sum(s.length for s in segments)
    return rebuilt


async def _inputs(
    stages: Sequence[WorkerLink],
    epoch: int,
    index: int,
    segments: tuple[Segment, ...],
    work: Sequence[Lost],
    step_ids: Iterator[int],
    hidden_size: int,
) -> torch.Tensor:
    """What enters stage ``index`` at ``segments``' positions: token ids, or the rows the stage
    before it kept (checked: a wrong shape drops that stage)."""
    if index == 0:
        return token_ids(segments, work)
    total = sum(s.length for s in segments)
    source = stages[index - 1]
    x = await source.recall(Recall(next(step_ids), epoch, segments))
    if tuple(x.shape) != (total, hidden_size) or not x.is_floating_point():
        why = f"recalled a tensor of shape {list(x.shape)} {x.dtype} for {total} positions"
        source.close_with(f"protocol error: {why}", CloseCode.PROTOCOL_ERROR)
        raise ProtocolError(f"worker {source.name} {why}")
    return x
