"""Copies of a stage's layers and caches, kept by the stage before it (the first stage's by the second).

Contract
--------
A stage whose memory holds its own range and the next stage's, without its KV budget falling
below the group's (the smallest over the stages; so a copy never costs the group a request it
could serve), also loads the next stage's layers (``Assign.copy_end``, :func:`copy_ends`): it
serves only its own, and the master fills the copy's caches in the background (``Fill`` of those
layers from the rows the stage kept leaving its own end: no transfer, only compute).  When the
next stage is lost, this stage takes its layers over (the repair prefers it,
:meth:`~master_core.standby.Standbys.repair_for`) with their caches as far as the copy got, and
the rebuild (:mod:`master_core.rebuild`) computes only the rest.  Without copies that rebuild
computes the lost layers for every position in flight: on a busy group, seconds.  The first
stage has no stage before it: the second stage copies it too where its memory allows
(``Assign.copy_first``), its caches filled from the token ids, which are sent with each ``Fill``
(a few bytes a position), and takes it over the same way.  (A standby member's copy,
:mod:`master_core.shadow`, covers every stage.)

``copy_ends(group, chosen, before)`` decides the copies of a pipeline about to be assigned
(:class:`Kept`): in a whole plan, where the memory allows; in a repair (``before``: each link's
assignment before it), a stage keeps a copy only where its range and the copied stage's range
are as they were (its caches and the copy stay), and none is added (that would load layers while
streams wait).

``await Copies.run()`` keeps the copies up to date until cancelled, like the standby's copy: a
``Fill`` of at most ``STEP_TOKENS`` positions at a time per copying stage, the oldest requests
first (and the cached prefixes they start from, whose copies are kept as long as they are
cached: ``cached``), of the positions every stage holds (``Request.computed``), and less than a step only
``FOLLOW`` seconds after the last.  Nobody waits for those steps (``WorkerLink.background``); the
worker computes them without taking every core, and each copy is given at most ``DUTY`` of its
stage's time (after a step that computed ``c`` seconds, its next waits ``c * (1 / DUTY - 1)``):
the streams' steps come first, so a burst of long prompts is copied over the seconds after it;
while a prompt is being computed, one step every ``PROMPTS_FIRST`` seconds at most.
A step refused (the stage wrote below what the copy held, or a step of that request was open) is
tried again; refused twice, that request's copy starts over from its beginning.  A request's
caches, and so its copy, are freed on the stage by the engine's ``Free``.  ``handover()`` is
called at every epoch change: the copies' counts are set aside, and ``take(link, layers)``
gives the rebuild what ``link`` held of ``layers`` (KV id -> positions; {} when it copied other
layers or nothing) and forgets it; a stage whose range and copy stay as they were goes on from
its counts (the worker kept those caches).  ``behind()`` is, per copy (``"<stage> [a, b)"``: the
stage keeping it and the layers it holds), the positions it lacks (/health ``stage_copies``);
``compute_seconds``, the workers' compute for the copies' steps so far.
A stage keeping two copies steps the one that stepped last, last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

import torch

from worker_core.wire import Assign, Fill

from .link import LinkGone, StepFailed, WorkerLink
from .rebuild import first_step, token_ids, work_of
from .request import Request

log = logging.getLogger(__name__)

# positions a step: small, because a serving step may queue behind it on the stage (the calibration
# bench's wan/full, at 64 a step and DUTY 0.25: 26.4 tokens/s; at 32 and 0.1: 29.3; no copies: 28.5)
STEP_TOKENS = 32
IDLE = 0.2  # seconds between looks when there is nothing to copy
FOLLOW = 2.0  # seconds a copy that lacks less than a step waits for more (a step of several costs less a position)
STEP_TIMEOUT = 60.0  # seconds a step may take on a busy stage before it is given up
REFUSALS = 2  # refused steps of a request before its copy starts over
# the most of its stage's compute time a copy takes: at a tenth, on this 2-core machine, a copy of 7-8
# layers gained 12 positions a second on 4 streams making 24 tokens a second (about 4 minutes to catch
# up on four 750-token prompts), and the second stage's two copies sharing a tenth fell behind
DUTY = 0.25
# seconds between a stage's copy steps while a prompt is being computed: the prompt's chunks and the
# streams' steps beside them come first (measured on this 2-core machine: the burst bench's p99 gap on
# wan rose to 3.3x the calm pace with copy steps at DUTY during the burst)
PROMPTS_FIRST = 5.0


class Copying(Protocol):
    """What the copies need of the group (:class:`~master_core.group.Group`)."""

    stages: list[WorkerLink]

    @property
    def serving(self) -> bool: ...

    def kv_budget(self, link: WorkerLink, start: int, end: int, copy_end: int = 0, copy_first: bool = False) -> int: ...


class Kept(NamedTuple):
    """The copies one stage keeps: ``Assign.copy_end`` (0: none) and ``Assign.copy_first``."""

    end: int = 0
    first: bool = False


NO_COPY = Kept()


def copy_ends(
    group: Copying, chosen: Sequence[tuple[WorkerLink, tuple[int, int]]], before: dict[WorkerLink, Assign] | None
) -> list[Kept]:
    """The copies each stage of ``chosen`` keeps; see the module docstring."""
    ranges = [rng for _, rng in chosen]
    kept = [NO_COPY] * len(chosen)
    if before is not None:
        for i, (link, (a, b)) in enumerate(chosen):
            old = before.get(link)
            if old is None or (old.layer_start, old.layer_end) != (a, b):
                continue
            end = old.copy_end if i + 1 < len(chosen) and ranges[i + 1] == (b, old.copy_end) else 0
            kept[i] = Kept(end, old.copy_first and i == 1 and ranges[0] == (0, a))
        return kept
    least = min(group.kv_budget(link, a, b) for link, (a, b) in chosen)
    for i, (link, (a, b)) in enumerate(chosen):
        end = ranges[i + 1][1] if i + 1 < len(chosen) and group.kv_budget(link, a, b, ranges[i + 1][1]) >= least else 0
        kept[i] = Kept(end, i == 1 and group.kv_budget(link, a, b, end, True) >= least)
    return kept


class Copies:
    def __init__(
        self,
        group: Copying,
        running: Callable[[], Iterable[Request]],
        step_ids: Iterator[int],
        cached: Callable[[int], bool] = lambda kv_id: False,
    ) -> None:
        self.group = group
        self._running = running
        self._cached = cached  # whether a KV id is a cached prefix (kept on the stages, its copy too)
        self._step_ids = step_ids
        # per copy (its stage, and whether it is of the first stage's layers), the assignment it
        # copies under and KV id -> positions it holds
        self._held: dict[tuple[WorkerLink, bool], tuple[Assign, dict[int, int]]] = {}
        self._refused: dict[tuple[WorkerLink, bool, int], int] = {}  # (copy, KV id) -> refusals in a row
        self._handed: dict[tuple[WorkerLink, bool], tuple[Assign, dict[int, int]]] = {}
        self._round = 0  # bumped by ``handover``: a step of an older round is not counted
        self._last: dict[WorkerLink, float] = {}  # when each stage's last step went (event-loop time)
        self._stepped: dict[tuple[WorkerLink, bool], float] = {}  # when each copy's last step went
        self._rest: dict[tuple[WorkerLink, bool], float] = {}  # when each copy may step again (``DUTY``)
        self.copied = 0  # positions computed for copies (for tests)
        self.compute_seconds = 0.0  # the workers' compute for the copies' steps so far (the calibration bench)

    def holders(self) -> list[tuple[WorkerLink, Assign, bool]]:
        """The serving stages' copies: each stage that keeps one, its assignment, and whether the
        copy is of the first stage's layers (else of the next stage's)."""
        if not self.group.serving:
            return []
        stages = [(s, a) for s in self.group.stages if (a := s.assignment) is not None]
        return [(s, a, first) for s, a in stages for first in (True, False) if (a.copy_first if first else a.copy_end)]

    def behind(self) -> dict[str, int]:
        """Per copy, the positions of the running requests it lacks (see the module docstring)."""
        reqs, lacking = self._eligible(), {}
        for link, asg, first in self.holders():
            held = self._mine(link, asg, first)[1]
            a, b = _layers(asg, first)
            lacking[f"{link.name} [{a}, {b})"] = sum(w.upto - w.start for w in work_of(reqs, held))
        return lacking

    def handover(self) -> None:
        """The pipeline changed: what each stage's copy holds is set aside for ``take``."""
        self._round += 1
        self._handed, self._held = self._held, {}
        self._refused.clear()

    def take(self, link: WorkerLink, layers: tuple[int, int]) -> dict[int, int]:
        """What ``link``'s copy of ``layers`` held when the pipeline was repaired (KV id ->
        positions), once; {} when it copied other layers or nothing."""
        return _of(self._handed.pop((link, layers[0] == 0), None), layers)

    def holding(self, link: WorkerLink, layers: tuple[int, int]) -> dict[int, int]:
        """What ``link``'s copy of ``layers`` holds now (KV id -> positions), as ``take``."""
        return _of(self._held.get((link, layers[0] == 0)), layers)

    def _mine(self, link: WorkerLink, asg: Assign, first: bool) -> tuple[Assign, dict[int, int]]:
        """The counts of ``link``'s copy under ``asg``: a new assignment's start over, unless the stage
        and its copy stay as they were (the worker kept both caches)."""
        mine = self._held.get((link, first))
        if mine is None or mine[0] is not asg:
            old = mine or self._handed.get((link, first))
            kept = dict(old[1]) if old is not None and _same(old[0], asg, first) else {}
            mine = self._held[(link, first)] = (asg, kept)
        return mine

    def _eligible(self) -> list[Request]:
        return sorted((r for r in self._running() if r.kv_id), key=lambda r: r.order)

    async def run(self) -> None:
        while True:
            stepped = False
            for link, asg, first in sorted(self.holders(), key=lambda h: self._stepped.get((h[0], h[2]), 0.0)):
                stepped |= await self._step(link, asg, first)
            if not stepped:
                await asyncio.sleep(IDLE)

    async def _step(self, link: WorkerLink, asg: Assign, first: bool) -> bool:
        """Send the next step of ``link``'s copy (of the first stage's layers, or the next
        stage's) and count it; False when there was none."""
        now = asyncio.get_running_loop().time()
        if now < self._rest.get((link, first), 0.0):  # (checked before any work: the loop looks every IDLE seconds)
            return False
        reqs = self._eligible()
        last = self._last.get(link, 0.0)
        if any(r.computed < len(r.prompt) for r in reqs) and now < last + PROMPTS_FIRST:
            return False
        mine = self._mine(link, asg, first)
        held = mine[1]
        needed = work_of(reqs, held)  # (a cached prefix they start from, copied whole, is still needed)
        live = {r.kv_id for r in reqs} | {w.kv_id for w in needed}
        for kv in [kv for kv in held if kv not in live and not self._cached(kv)]:
            del held[kv]  # (its caches are freed with the request's)
        size = min(STEP_TOKENS, asg.max_batch_tokens)
        segments = first_step([w for w in needed if w.upto > w.start], size, now < last + FOLLOW, bases=False)
        if segments is None:
            return False
        self._last[link] = self._stepped[(link, first)] = now
        round_ = self._round
        x = token_ids(segments, needed) if first else torch.empty(0)  # (else the rows it kept)
        fill = Fill(next(self._step_ids), asg.epoch, segments, *_layers(asg, first), x)
        try:
            result = await link.background(fill, STEP_TIMEOUT)
        except (StepFailed, LinkGone, asyncio.TimeoutError) as e:
            if round_ == self._round and not isinstance(e, LinkGone):
                for s in segments:
                    key = (link, first, s.request_id)
                    self._refused[key] = self._refused.get(key, 0) + 1
                    if self._refused[key] >= REFUSALS:
                        log.info("%s: the copy of KV id %d starts over (%s)", link.name, s.request_id, e or "timed out")
                        self._refused.pop(key)
                        held.pop(s.request_id, None)
            return False
        self._rest[(link, first)] = asyncio.get_running_loop().time() + result.compute_seconds * (1 / DUTY - 1)
        self.compute_seconds += result.compute_seconds
        if round_ == self._round and self._held.get((link, first)) is mine:
            for s in segments:
                held[s.request_id] = s.start + s.length
                self._refused.pop((link, first, s.request_id), None)
            self.copied += sum(s.length for s in segments)
        return True


def _of(copy: tuple[Assign, dict[int, int]] | None, layers: tuple[int, int]) -> dict[int, int]:
    """A copy's counts, where it is of ``layers``."""
    return dict(copy[1]) if copy is not None and _layers(copy[0], layers[0] == 0) == layers else {}


def _same(old: Assign, new: Assign, first: bool) -> bool:
    """Whether a stage keeps the same range and the same copy under ``new`` as under ``old``."""
    return (old.layer_start, old.layer_end) == (new.layer_start, new.layer_end) and _layers(old, first) == _layers(
        new, first
    )


def _layers(asg: Assign, first: bool) -> tuple[int, int]:
    """The layers a copy holds: the first stage's, or the next stage's."""
    return (0, asg.layer_start) if first else (asg.layer_end, asg.copy_end)
