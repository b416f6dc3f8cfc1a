"""The members of a group standing by: what each keeps loaded, and the repair of a lost stage.

Contract
--------
``Standbys(group)`` belongs to one :class:`~master_core.group.Group` and reads its members,
stages and model (:class:`Members`); it sends only ``Assign``s of layers no pipeline uses.

* :meth:`Standbys.warm` (after each pipeline is built): a member standing by whose memory holds
  the whole model loads it (keeping the rows at the stage ends, so it can copy the open
  requests' caches: :mod:`master_core.shadow`; :meth:`Standbys.copier` names the member that
  does); one whose memory does not loads a span of consecutive stages' ranges, the most bytes
  of weights its memory holds (:func:`~master_core.placement.standby_range`).
  :meth:`Standbys.kept_loaded` says what a member holds or is loading.
* :meth:`Standbys.repair_for` (a stage lost): a :class:`Repair` that keeps every other stage,
  its range to the member standing by best placed to take it (the copier first, then the stage
  before it, or for the first stage the second, where that keeps a copy of the range,
  :mod:`master_core.copies`, then those
  whose kept layers contain that range, the whole model or a span, then any whose memory holds it:
  :func:`~master_core.placement.replacement`), or, where none can, to a neighbour of the lost
  stage or both beside their own ranges (:func:`~master_core.placement.widening`); None when
  nobody can (the whole pipeline is then planned again).  Its :class:`Rebuilt` says what the
  engine rebuilds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from worker_core.precision import Precision
from worker_core.wire import Assign, itemsize

from .config import MasterConfig
from .link import LinkGone, StepFailed, Superseded, WorkerLink
from .model_dims import ModelDims
from .placement import Member, ModelShape, replacement, standby_range, widening

log = logging.getLogger("molink.group")


@dataclass(frozen=True)
class Widened:
    """Stage ``index`` of the new pipeline took over ``layers`` of the lost stage beside its own."""

    index: int
    layers: tuple[int, int]


@dataclass(frozen=True)
class Rebuilt:
    """What a repair leaves to rebuild where stage ``lost`` of the previous pipeline was: either
    a standby member took over the lost range whole as stage ``index`` of the new pipeline, or
    (``widened``, in pipeline order; ``index`` None) one neighbour of the lost stage or both took
    its layers over beside their own, and the new pipeline has one stage fewer.  Every other
    stage keeps its layers and caches."""

    lost: int
    index: int | None = None
    widened: tuple[Widened, ...] = ()


@dataclass(frozen=True)
class Repair:
    """The serving pipeline but one stage, as ``rebuilt`` says, every other stage as it was:
    each chosen link's range, in pipeline order, and why the others stand by."""

    rebuilt: Rebuilt
    chosen: tuple[tuple[WorkerLink, tuple[int, int]], ...]
    standby: dict[str, str]

    def describe(self) -> str:
        """Who takes the lost range over (for the log)."""
        chosen, r = self.chosen, self.rebuilt
        if r.index is not None:
            who = f"{chosen[r.index][0].name} replaces it"
        else:
            who = "; ".join(
                f"{chosen[w.index][0].name} takes over its layers [{w.layers[0]}, {w.layers[1]}) beside its own "
                f"([{chosen[w.index][1][0]}, {chosen[w.index][1][1]}) now)"
                for w in r.widened
            )
        return f"{who}; the other stages keep their layers and caches"


class Members(Protocol):
    """What :class:`Standbys` reads of its group (:class:`~master_core.group.Group`)."""

    config: MasterConfig
    dims: ModelDims
    links: list[WorkerLink]
    stages: list[WorkerLink]
    epoch: int

    @property
    def serving(self) -> bool: ...

    def placeable_links(self) -> list[WorkerLink]: ...

    def stage_ends(self) -> tuple[int, ...]: ...

    def shadow_target(self) -> WorkerLink | None: ...

    def members(self, links: list[WorkerLink], size: int) -> list[Member]: ...

    async def assignment(self, link: WorkerLink, a: int, b: int, epoch: int, standby: bool = False) -> Assign: ...

    def spawn(self, coro: Awaitable[None], what: str) -> None: ...


class Standbys:
    """See the module docstring."""

    def __init__(self, group: Members) -> None:
        self.group = group
        self.warming: dict[WorkerLink, tuple[int, int]] = {}  # members loading layers to stand by with: which

    def _shape(self, links: list[WorkerLink]) -> tuple[int, ModelShape]:
        """Bytes a value of the widest dtype among ``links``, and the model's shape at that size."""
        size = max((itemsize(link.hello.dtype) for link in links), default=4)
        return size, self.group.dims.shape(Precision(self.group.config.quantize), size)

    def _ranges(self) -> list[tuple[int, int]]:
        """The serving stages' layer ranges, in pipeline order."""
        return [(s.assignment.layer_start, s.assignment.layer_end) for s in self.group.stages if s.assignment]

    def kept_loaded(self, link: WorkerLink) -> tuple[int, int] | None:
        """The layers a member has loaded (or is loading to stand by with), or None."""
        if link in self.warming:
            return self.warming[link]
        asg = link.assignment
        return None if asg is None or link.loading else (asg.layer_start, asg.layer_end)

    def holds_whole_model(self, link: WorkerLink) -> bool:
        return link not in self.warming and self.kept_loaded(link) == (0, self.group.dims.num_layers)

    def copier(self) -> WorkerLink | None:
        """The standby member that keeps a copy of the open requests' caches
        (:mod:`master_core.shadow`): the first that holds the whole model and keeps the rows at
        the pipeline's stage ends; None when none does (or the group is not serving)."""
        g = self.group
        if not g.serving:
            return None
        ends = g.stage_ends()
        for link in g.placeable_links():
            asg = link.assignment
            if link not in g.stages and self.holds_whole_model(link) and asg is not None and asg.tapes == ends:
                return link
        return None

    def warm(self) -> None:
        """Each standby member that holds the whole model and has not loaded it loads it now
        (an ``Assign`` of every layer, served by no pipeline, keeping the rows at the stage ends
        of this pipeline): if a stage is lost, the member that takes its range over takes those
        layers from memory (``worker_core.shard.carve``) instead of reading them, and the repair
        is that much shorter; with the caches it computed meanwhile (:mod:`master_core.shadow`),
        shorter still.  One loaded for another pipeline is told the new stage ends.  A standby
        member whose memory does not hold the whole model loads a span of consecutive stages'
        ranges instead (:func:`~master_core.placement.standby_range`), out of which a repair of
        any stage inside it takes that stage's layers (``worker_core.shard.carve``)."""
        g = self.group
        n = g.dims.num_layers
        size, shape = self._shape(g.links)
        ends = g.stage_ends()
        ranges = self._ranges()
        serving = bool(ranges) and len(ranges) == len(g.stages)
        for link in g.placeable_links():
            if link in g.stages or link.loading or link in self.warming:
                continue
            if self.holds_whole_model(link) and (link.assignment is None or link.assignment.tapes == ends):
                continue
            member = g.members([link], size)
            if replacement(shape, member, 0, n) is not None:
                self.warming[link] = (0, n)
                g.spawn(self._load(link, 0, n), f"loading the whole model on {link.name}")
                continue
            if not serving:
                continue
            others = (self.kept_loaded(x) for x in g.placeable_links() if x is not link and x not in g.stages)
            span = standby_range(shape, ranges, member[0], [r for r in others if r is not None])
            if span is not None and self.kept_loaded(link) != span:
                self.warming[link] = span
                g.spawn(self._load(link, *span), f"loading layers {span} on {link.name}")

    async def _load(self, link: WorkerLink, a: int, b: int) -> None:
        g = self.group
        whole = (a, b) == (0, g.dims.num_layers)
        what = "the whole model" if whole else f"layers [{a}, {b})"
        try:
            asg = await g.assignment(link, a, b, g.epoch, standby=whole)
            await link.assign(asg, g.config.assign_timeout)
            log.info("%s stands by with %s loaded", link.name, what)
        except (LinkGone, StepFailed, asyncio.TimeoutError, Superseded) as e:
            log.info("%s stands by without %s loaded: %s", link.name, what, e or type(e).__name__)
        finally:
            self.warming.pop(link, None)

    def repair_for(self, lost: WorkerLink) -> Repair | None:
        """See the module docstring."""
        g = self.group
        if not g.serving or lost not in g.stages or lost.assignment is None:
            return None
        kept = [s for s in g.stages if s is not lost]
        if any(not s.placeable or s.assignment is None for s in kept):
            return None
        spares = [link for link in g.placeable_links() if link not in g.stages]
        a, b = lost.assignment.layer_start, lost.assignment.layer_end
        warm = [x for x in spares if x not in self.warming and _contains(self.kept_loaded(x), a, b)]
        shadow = g.shadow_target()  # it holds the open requests' caches: it takes the range if it can
        spares = [shadow, *(x for x in warm if x is not shadow)] if shadow is not None else warm or spares
        size, shape = self._shape([*g.stages, *spares])
        index, ranges = g.stages.index(lost), self._ranges()
        # the neighbour that keeps a copy of the lost layers and their caches (master_core.copies):
        # the stage before, or the second stage for the first
        keeper = index + 1 if index == 0 else index - 1
        near = g.stages[keeper].assignment if 0 <= keeper < len(g.stages) else None
        copied = near is not None and (
            (near.layer_end, near.copy_end) == (a, b) if index else near.copy_first and near.layer_start == b
        )
        if spares:
            members = g.members(spares, size)
            copier_fits = shadow is not None and replacement(shape, members[:1], a, b) is not None
            pick = 0 if copier_fits else None if copied else replacement(shape, members, a, b)
            if pick is not None:
                chosen = [(spares[pick] if i == index else x, r) for i, (x, r) in enumerate(zip(g.stages, ranges))]
                standby = {
                    x.name: "standing by after taking no stage in the repair" for x in spares if x is not spares[pick]
                }
                return Repair(Rebuilt(index, index), tuple(chosen), standby)
        if copied and near is not None:  # the neighbour keeps the lost layers loaded, and their caches
            span = (a, near.layer_end) if index == 0 else (near.layer_start, b)
            widened: tuple[tuple[int, tuple[int, int]], ...] | None = ((keeper, span),)
        else:
            widened = widening(shape, ranges, index, dict(enumerate(g.members(g.stages, size))))
        if widened is None:
            return None
        wide = dict(widened)
        chosen = [(x, wide.get(i, r)) for i, (x, r) in enumerate(zip(g.stages, ranges)) if i != index]
        taken = tuple(Widened(j if j < index else j - 1, (max(a, lo), min(b, hi))) for j, (lo, hi) in widened)
        standby = {x.name: "standing by: its memory does not hold the lost range" for x in spares}
        return Repair(Rebuilt(index, None, taken), tuple(chosen), standby)


def _contains(kept: tuple[int, int] | None, a: int, b: int) -> bool:
    """Whether layers ``kept`` (a whole model, a span, or None) contain ``[a, b)``: the range is
    then taken from memory (``worker_core.shard.carve``)."""
    return kept is not None and kept[0] <= a and b <= kept[1]
