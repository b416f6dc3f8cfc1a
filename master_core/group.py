"""Group membership and the serving pipeline built from it.

Contract
--------
:class:`Group` holds every connected :class:`~master_core.link.WorkerLink` in join order and
the group's lifecycle, a :class:`GroupState` changed only by :meth:`Group.move` (the allowed
moves are the table ``_MOVES``)::

    WAITING -> PLACING -> LOADING -> SERVING
                  ^  |        |  \\-> CANNOT_PLACE
                  |  +-> WAITING | CANNOT_PLACE
                  +-- any membership change (SERVING, LOADING, WAITING, CANNOT_PLACE)

Whenever membership changes it re-plans (unless a newcomer would only stand by: then the
running pipeline is left alone).  A serving stage lost while a standby member can hold its
range is *repaired* (:mod:`master_core.standby`): that member takes the range and every other
stage keeps its range and its caches (the engine rebuilds only the new stage,
:mod:`master_core.rebuild`).  Where no standby member can, a neighbour of the lost stage whose
memory holds both ranges takes the lost layers over beside its own (its ``Assign`` widens its
range; it keeps its caches and computes only those layers', ``wire.Fill``), or, where neither's
memory does, both neighbours split them (:func:`~master_core.placement.widening`): the pipeline
has a stage fewer and every stage keeps its caches.  Otherwise the whole pipeline is planned
again.  A standby member whose memory holds the whole model loads it while it waits (an
``Assign`` of every layer that no pipeline uses), so a repair takes its range from memory; such
a member is preferred.  One whose memory does not hold the whole model loads a span of
consecutive stages' ranges instead (the most bytes of weights its memory holds:
:func:`~master_core.placement.standby_range`), and a repair of a stage inside it prefers it.  Either
way the state becomes PLACING, ``stages`` empties, ``epoch`` goes up and listeners registered
with ``on_reset`` are called with the stages that were serving and, for a repair, its
:class:`~master_core.standby.Rebuilt` (the engine frees its requests' caches there and replays
them on the next pipeline, or keeps them and rebuilds the stages the repair names).
A newcomer that would change a serving pipeline while requests run waits for them to end
first: a join never costs running requests a replay unless the group is busy longer than
``JOIN_REPLAN_WAIT``, and then only once that replay is cheap (``JOIN_REPLAY_BUDGET``, from
``replay_cost``, set by the master) or ``JOIN_REPLAN_LIMIT`` passed.  A repaired pipeline is
planned whole again the same way (from ``REPAIR_SETTLE`` after the repair), once a whole plan
would differ from it (a repair adds no copies, :mod:`~master_core.copies`, and a widened stage
may be the slowest): a member lost for good leaves the group as well placed, and as well
covered, as if it had never been there.  A link dropped as hung (``WorkerLink.on_gone``) leaves
like a closed one; ``late_frames`` counts what dropped links sent after.

With fewer than ``min_workers`` placeable links it is WAITING.  Otherwise it plans the
pipeline order and layer ranges from each member's offered memory, measured speed and
announced link
(:func:`~master_core.placement.planner_members`, :func:`~master_core.placement.plan_pipeline`);
a plan that cannot hold the model is CANNOT_PLACE.  Then LOADING: each chosen worker gets its
``Assign`` (KV budget sized from the real parameter counts of its range, see
:class:`~master_core.model_dims.ModelDims`) and the group waits for every ``Ready``; then
``stages`` is the pipeline in order and the state is SERVING (``serving`` is True,
``wait_serving()`` returns).  A failed assignment re-plans; weights that cannot be prepared,
or a worker that loaded another model, is CANNOT_PLACE.  ``problem`` is the state said for
people (None while serving), for /health and the dashboard; code decides by ``state``.

A worker may ask to leave (wire ``Leave``; :meth:`Group.leave`).  Now: its link closes with
"left the group" and is removed at once (re-plan, replay).  ``finish``: a link serving a stage
while requests run moves to DRAINING: no placement chooses it any more, it keeps serving the
current pipeline until every request running when the Leave arrived has ended (as
``running_requests``, set by the master, tells) or ``finish_timeout`` passes, then it leaves
the same way.  Placement only ever considers links in CONNECTING or READY.

``await stop()`` (the master's shutdown) cancels and awaits every task the group started
(re-plans, drains); departures after it are expected and re-plan nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from worker_core.control import FINISH_TIMEOUT
from worker_core.precision import Precision
from worker_core.tasks import end_tasks
from worker_core.weights import manifest_digest
from worker_core.wire import Assign, Routed, itemsize

from .config import MasterConfig
from .copies import NO_COPY, Kept, copy_ends
from .draft_offer import DraftOffer
from .link import LinkGone, LinkState, StepFailed, WorkerLink
from .member_path import member_path
from .model_dims import ModelDims
from .placement import (
    Member,
    PlacementError,
    kv_token_budget,
    plan_pipeline,
    planner_members,
)
from .routes import NO_LOOP_BACK, Hop, route_pipeline
from .standby import Rebuilt, Repair, Standbys
from .weight_source import WeightSource

log = logging.getLogger("molink.group")

DRAIN_POLL = 0.05  # seconds between checks whether a finishing worker's requests have ended
JOIN_REPLAN_WAIT = 120.0  # seconds a newcomer waits for running requests to end before the re-plan it needs ...
JOIN_REPLAY_BUDGET = 2.0  # ... then it goes once replaying the running requests would cost at most this (s) ...
JOIN_REPLAN_LIMIT = 600.0  # ... or once it waited this long
# seconds after a repair before a re-plan of the repaired pipeline is considered: a member that dropped
# out for a moment (an app restarted, a network blip) rejoins first, and the group is planned once
REPAIR_SETTLE = 60.0


class GroupState(Enum):
    WAITING = "waiting"  # fewer placeable members than min_workers
    PLACING = "placing"  # membership changed: a new plan is being made
    LOADING = "loading"  # assignments sent: waiting for every Ready
    SERVING = "serving"
    CANNOT_PLACE = "cannot place"  # these members cannot hold or load the model (a membership change retries)

    @property
    def building(self) -> bool:
        """A pipeline is being built: requests wait for it instead of being refused."""
        return self in (GroupState.PLACING, GroupState.LOADING)


_MOVES: dict[GroupState, frozenset[GroupState]] = {
    GroupState.WAITING: frozenset({GroupState.PLACING}),
    GroupState.PLACING: frozenset({GroupState.WAITING, GroupState.LOADING, GroupState.CANNOT_PLACE}),
    GroupState.LOADING: frozenset({GroupState.SERVING, GroupState.PLACING, GroupState.CANNOT_PLACE}),
    GroupState.SERVING: frozenset({GroupState.PLACING}),
    GroupState.CANNOT_PLACE: frozenset({GroupState.PLACING}),
}


@dataclass(frozen=True)
class Placement:
    """A plan for one set of links: each chosen link's range, and why the others stand by."""

    chosen: tuple[tuple[WorkerLink, tuple[int, int]], ...]
    standby: dict[str, str]


def stage_kv_tokens(
    dims: ModelDims,
    free_memory: int,
    dtype: str,
    start: int,
    end: int,
    cap: int,
    precision: Precision = Precision.NONE,
    device: str = "cpu",
    tapes: int = 0,
) -> int:
    """KV budget (tokens) of a worker offering ``free_memory`` bytes of ``device`` and computing
    in ``dtype`` when it serves layers ``[start, end)``: its real weight bytes first (every
    parameter of its layers at the group's ``precision``, embeddings or head; MoE experts
    included), half the rest for KV at ``dtype``.  A token costs its KV on every layer and, on a
    CPU, on any stage but the last, the output row it keeps for a rebuild of the next stage
    (``wire.Recall``; a GPU keeps those in host memory), and the rows a standby keeps at
    ``tapes`` stage ends (``Assign.tapes``)."""
    size = itemsize(dtype)
    rows = 0 if device.startswith("cuda") else tapes + (end < dims.num_layers)
    weights = dims.stage_bytes(start, end, precision, size)
    return kv_token_budget(free_memory, weights, dims.token_bytes(start, end, size, rows), cap)


class Group:
    def __init__(self, config: MasterConfig, model_ref: str, dims: ModelDims) -> None:
        self.config = config
        self.model_ref = model_ref  # what workers resolve: a folder path, hub id, or "default"
        self.dims = dims
        self.links: list[WorkerLink] = []
        self.stages: list[WorkerLink] = []
        self.epoch = 0
        self.kv_tokens = 0  # smallest KV budget over the stages, in tokens
        self.hops: list[Hop] = []  # hop i: stage i -> stage i+1 of the current pipeline, direct or relayed
        self.loop_back = NO_LOOP_BACK  # last stage -> first stage: drawn tokens go straight back when direct
        self.state = GroupState.WAITING
        self.problem: str | None = f"waiting for {config.min_workers} worker(s)"
        self._serving = asyncio.Event()  # set exactly while SERVING
        self._listeners: list[Callable[[list[WorkerLink], Rebuilt | None], None]] = []
        self._replan_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # re-plans and drains, awaited by stop()
        self.closing = False  # shutting down: departures are expected then
        self.weights: WeightSource | None = None  # set in a paired group: workers get weights from us
        self.draft: DraftOffer | None = None  # the master's draft model: the last stage holds it too
        self.draft_weights: WeightSource | None = None  # its tensors, in a paired group
        self.standby: dict[str, str] = {}  # live members the last plan left out -> why
        self._planned: tuple[tuple[WorkerLink, ...], Placement] | None = None  # the last plan, for its links
        self.running_requests: Callable[[], set[int]] = set  # ids of the requests running now (set by the master)
        self.replay_cost: Callable[[], float | None] = lambda: None  # seconds to recompute them (set by the master)
        self.finish_timeout = FINISH_TIMEOUT  # seconds a finishing worker is kept for its running requests
        self.late_frames = 0  # frames read from links after they were dropped as hung
        self._repair: Repair | None = None  # the next re-plan keeps all stages but one (see _invalidate)
        self.repairs = 0  # pipelines served again by replacing one lost stage
        self.standbys = Standbys(self)  # what the members standing by keep loaded; a lost stage's repair
        self._idle_pending = False  # a re-plan (a newcomer's, or after a repair) waits for the running requests to end

    # ------------------------------------------------------------------ state
    def move(self, to: GroupState, problem: str | None = None) -> None:
        """The one place the group's state changes (with its text for people); an illegal
        move is a bug (ValueError).  Staying in a state only updates the text."""
        if to is not self.state and to not in _MOVES[self.state]:
            raise ValueError(f"group: cannot go from {self.state.value} to {to.value}")
        self.state = to
        self.problem = None if to is GroupState.SERVING else problem
        if to is GroupState.SERVING:
            self._serving.set()
        else:
            self._serving.clear()

    @property
    def paired(self) -> bool:
        """A paired group (its members get their weights from us): direct hops need both stages'
        pinned certificates."""
        return self.weights is not None

    @property
    def serving(self) -> bool:
        return self.state is GroupState.SERVING

    async def wait_serving(self) -> None:
        """Return once the group serves (at once if it does)."""
        await self._serving.wait()

    async def stop(self) -> None:
        """Shutdown: no more re-plans; cancel and await (bounded) every task the group started."""
        self.closing = True
        await end_tasks(list(self._tasks))

    def spawn(self, coro: Awaitable[None], what: str) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: _log_failure(t, what))

    async def _delivery(self, start: int, end: int) -> dict[str, Any]:
        """Assign fields that make the master deliver the range's weights (paired groups)."""
        if self.weights is None:
            return {}
        config_json, specs = await asyncio.to_thread(self.weights.manifest, start, end)
        return {
            "model": manifest_digest(config_json, specs),
            "config_json": config_json,
            "manifest": tuple(specs),
            "hub": self.weights.hub,
        }

    def on_reset(self, listener: Callable[[list[WorkerLink], Rebuilt | None], None]) -> None:
        """Call ``listener(previous_stages, lost)`` at every epoch change: ``lost`` is the index
        of the one stage a standby member is taking over (the other stages keep their ranges
        and caches), or None when the whole pipeline is planned again."""
        self._listeners.append(listener)

    def live_links(self) -> list[WorkerLink]:
        return [link for link in self.links if link.state is not LinkState.GONE]

    def placeable_links(self) -> list[WorkerLink]:
        """Live links a placement may choose: not leaving."""
        return [link for link in self.links if link.placeable]

    # ------------------------------------------------------------------ membership
    def add(self, link: WorkerLink) -> None:
        link.on_leave = self.leave
        link.on_gone = self.remove
        link.on_late = self._count_late
        link.on_moved = self.hop_moved
        self.links.append(link)
        log.info(
            "worker %s joined from %s (%s, %.1f GB free)",
            link.name,
            link.peer,
            link.hello.device_name,
            link.hello.free_memory / 1e9,
        )
        if self._plan_unchanged():
            log.info("the pipeline stays as it is: %s stands by (%s)", link.name, self.standby.get(link.name))
            self.standbys.warm()
            return
        if self.serving and self.running_requests():
            log.info("%s joins the pipeline once the running requests end", link.name)
            self._when_idle("for a newcomer")
            self.standbys.warm()  # meanwhile it stands by, and may replace a lost stage
            return
        self._schedule_replan()

    def _count_late(self) -> None:
        self.late_frames += 1

    async def _settle(self) -> None:
        """``REPAIR_SETTLE`` after a repair: plan the pipeline whole again once idle, if that changes it."""
        await asyncio.sleep(REPAIR_SETTLE)
        if self.serving:
            self._when_idle("after a repair")

    def _when_idle(self, why: str) -> None:
        """Plan the pipeline whole again once no request runs (:meth:`_replan_when_idle`), unless
        a re-plan already waits for that."""
        if not self._idle_pending:
            self._idle_pending = True
            self.spawn(self._replan_when_idle(), f"re-planning {why}")

    async def _replan_when_idle(self) -> None:
        """Re-plan once no request runs, if the pipeline still serves and a whole plan with the
        members there are then would change it (a newcomer's place, a repaired pipeline's).  Past
        ``JOIN_REPLAN_WAIT`` it goes as soon as replaying the running requests would cost at most
        ``JOIN_REPLAY_BUDGET`` seconds (``replay_cost``, None: unknown, go), and past
        ``JOIN_REPLAN_LIMIT`` whatever it costs: a re-plan under load recomputes every running
        request on every stage, a stall of every stream."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            while self.serving and self.running_requests():
                waited = loop.time() - began
                if waited >= JOIN_REPLAN_LIMIT:
                    break
                if waited >= JOIN_REPLAN_WAIT:
                    cost = self.replay_cost()
                    if cost is None or cost <= JOIN_REPLAY_BUDGET:
                        break
                await asyncio.sleep(DRAIN_POLL)
        finally:
            self._idle_pending = False
        if self.serving and not self._plan_unchanged():
            self._schedule_replan()

    def _plan_unchanged(self) -> bool:
        """Serving, and a whole plan with the current members would keep every stage, range and
        copy (a newcomer stands by; a repaired pipeline is what a plan would make): nothing needs to move."""
        if not self.serving or not self.stages:
            return False
        try:
            placement = self._place(self.placeable_links())
        except PlacementError:
            return False
        held = [(s, a) for s in self.stages if (a := s.assignment) is not None]
        if list(placement.chosen) != [(s, (a.layer_start, a.layer_end)) for s, a in held]:
            return False
        if copy_ends(self, placement.chosen, None) != [Kept(a.copy_end, a.copy_first) for _, a in held]:
            return False
        self.standby = placement.standby
        return True

    def leave(self, link: WorkerLink, finish: bool) -> None:
        """The worker of ``link`` asked to leave: now, or (``finish``) after the requests
        running at this moment have ended."""
        if link.state is LinkState.GONE or link not in self.links or (finish and link.state is LinkState.DRAINING):
            return  # gone, or already finishing
        if finish and link.state is LinkState.READY and link in self.stages and self.serving:
            running = self.running_requests()
            if running:
                link.move(LinkState.DRAINING)
                log.info(
                    "worker %s leaves after %d running request(s) end (at most %.0f s)",
                    link.name,
                    len(running),
                    self.finish_timeout,
                )
                self.spawn(self._drain(link, running), f"draining {link.name}")
                return
        self._depart(link)

    async def _drain(self, link: WorkerLink, running: set[int]) -> None:
        """Keep a DRAINING link serving until ``running`` requests end, it stops being a stage
        (a re-plan happened meanwhile), it is gone, or ``finish_timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.finish_timeout
        while link.state is LinkState.DRAINING and link in self.stages and running & self.running_requests():
            if loop.time() >= deadline:
                log.warning(
                    "worker %s: requests still running after %.0f s; it leaves anyway", link.name, self.finish_timeout
                )
                break
            await asyncio.sleep(DRAIN_POLL)
        self._depart(link)

    def _depart(self, link: WorkerLink) -> None:
        """Close a leaving link and remove it at once (before any lane sees the closed link
        under the old epoch): the re-plan and the replay start now."""
        if link.state is not LinkState.GONE:
            link.close_with("left the group")
        self.remove(link)

    def remove(self, link: WorkerLink) -> None:
        if link in self.links:
            self.links.remove(link)
            if self.closing:
                return
            log.warning("worker %s left: %s", link.name, link.gone_reason)
            if link in self.stages or not self.serving:
                self._schedule_replan(self.standbys.repair_for(link))

    # ------------------------------------------------------------------ planning
    def members(self, links: list[WorkerLink], size: int) -> list[Member]:
        """The planner's view of ``links`` (memory, measured speed, link) at ``size`` bytes a value."""
        return planner_members([x.hello for x in links], self.dims.largest_layer_params, self.dims.hidden_size, size)

    def _schedule_replan(self, repair: Repair | None = None) -> None:
        self._invalidate(repair)
        self.spawn(self._replan(), "re-planning")

    def _invalidate(self, repair: Repair | None = None) -> None:
        """A new epoch, no pipeline: the listeners learn which stages served and, for a repair,
        which one is being replaced; the next ``_replan`` uses ``repair`` if its links still can."""
        self.move(GroupState.PLACING, "placing the model on the members")
        previous, self.stages, self.hops, self.loop_back = self.stages, [], [], NO_LOOP_BACK
        self.epoch += 1
        self._repair = repair
        rebuilt = repair.rebuilt if repair is not None else None
        if repair is not None:
            log.warning("stage %d is lost: %s", repair.rebuilt.lost, repair.describe())
        for listener in self._listeners:
            listener(previous, rebuilt)

    async def _replan(self) -> None:
        async with self._replan_lock:
            if self.serving:
                return
            while True:
                live = self.placeable_links()
                if len(live) < self.config.min_workers:
                    why = f"waiting for workers: {len(live)} of {self.config.min_workers} joined"
                    self.move(GroupState.WAITING, why)
                    return
                epoch = self.epoch
                repair, self._repair = self._repair, None
                try:  # polynomial (milliseconds at 64 members), still CPU work: off the event loop
                    if repair is not None and all(link in live for link, _ in repair.chosen):
                        placement = Placement(repair.chosen, repair.standby)
                        self.repairs += 1
                    else:
                        if repair is not None:  # a link of it went meanwhile: plan the whole pipeline
                            self._invalidate()
                            epoch = self.epoch
                        repair = None
                        placement = await asyncio.to_thread(self._place, live)
                except PlacementError as e:
                    self.move(GroupState.CANNOT_PLACE, f"the group cannot hold the model: {e}")
                    log.error("cannot place the model: %s", e)
                    return
                self.standby = placement.standby
                for name, why in placement.standby.items():
                    log.info("%s stands by: %s", name, why)
                chosen = placement.chosen
                self.move(GroupState.LOADING, "loading layers on workers")
                before = {x: x.assignment for x, _ in chosen if x.assignment is not None} if repair else None
                assignments = []
                for (link, (a, b)), kept in zip(chosen, copy_ends(self, chosen, before)):
                    try:
                        assignments.append(await self.assignment(link, a, b, epoch, kept=kept))
                    except Exception as e:  # an unreadable checkpoint: nothing a re-plan can fix
                        why = f"cannot prepare the weights of layers [{a}, {b}): {type(e).__name__}: {e}"
                        self.move(GroupState.CANNOT_PLACE, why)
                        log.exception("cannot prepare the weights of layers [%d, %d)", a, b)
                        return
                try:
                    readies = await asyncio.gather(
                        *(link.assign(asg, self.config.assign_timeout) for (link, _), asg in zip(chosen, assignments))
                    )
                except (LinkGone, StepFailed, asyncio.TimeoutError) as e:
                    log.warning("assignment failed, re-planning: %s", e or type(e).__name__)
                    for link, _ in chosen:
                        if link.state is not LinkState.READY:
                            link.close_with(f"assignment failed: {e or type(e).__name__}")
                            if link in self.links:
                                self.links.remove(link)
                    if self.epoch == epoch:
                        self._invalidate()
                    continue
                if self.epoch != epoch:  # membership changed while loading
                    continue
                bad = [link for (link, _), r in zip(chosen, readies) if r.vocab_size != self.dims.vocab_size]
                if bad:
                    self.move(GroupState.CANNOT_PLACE, f"worker {bad[0].name} loaded a different model")
                    return
                full = [link for link, r in zip([x for x, _ in chosen], readies) if not self._stored_as_asked(link, r)]
                if full:  # a worker that ignores Assign.quantize (older than the field) overfills its memory
                    why = f"worker {full[0].name} did not store its layers at --quantize {self.config.quantize}"
                    self.move(GroupState.CANNOT_PLACE, f"{why} (update MoLink on it)")
                    return
                stages = [link for link, _ in chosen]
                try:
                    hops, loop_back = await route_pipeline(stages, epoch, self.paired)
                except (LinkGone, asyncio.TimeoutError) as e:
                    loop_back = Hop(False, reason=f"routing failed: {e or type(e).__name__}")
                    hops = [loop_back] * (len(stages) - 1)
                if self.epoch != epoch:  # membership changed while routing
                    continue
                self.stages, self.hops, self.loop_back = stages, hops, loop_back
                self.kv_tokens = min(asg.kv_tokens for asg in assignments)
                self.move(GroupState.SERVING)
                self.standbys.warm()
                if repair is not None:  # (once idle, a whole plan is made if it would differ)
                    self.spawn(self._settle(), "re-planning a repaired pipeline")
                log.info(
                    "serving epoch %d on %d stage(s): %s; hops: %s",
                    epoch,
                    len(self.stages),
                    ", ".join(f"{link.name}[{a}:{b})" for link, (a, b) in chosen),
                    "; ".join(h.describe() for h in hops) or "none",
                )
                return

    def kv_budget(
        self, link: WorkerLink, start: int, end: int, copy_end: int = 0, copy_first: bool = False, tapes: int = 0
    ) -> int:
        """``link``'s KV budget serving layers ``[start, end)``, with a copy of ``[end, copy_end)``
        (:mod:`master_core.copies`: those layers' weights, and the rows kept at ``end`` too) and
        with ``copy_first`` one of ``[0, start)``."""
        return self._kv_tokens(
            link, link.hello.free_memory, 0 if copy_first else start, copy_end or end, tapes + bool(copy_end)
        )

    def _kv_tokens(self, link: WorkerLink, free: int, start: int, end: int, tapes: int) -> int:
        h, precision = link.hello, Precision(self.config.quantize)
        return stage_kv_tokens(
            self.dims, free, h.dtype, start, end, self.config.max_kv_tokens, precision, h.device, tapes
        )

    async def assignment(
        self, link: WorkerLink, a: int, b: int, epoch: int, standby: bool = False, kept: Kept = NO_COPY
    ) -> Assign:
        """The ``Assign`` of layers ``[a, b)`` for ``link`` (its KV budget from its memory);
        ``standby``: the whole model of a standby member, keeping the rows at the serving
        pipeline's stage ends (:meth:`stage_ends`); ``kept``: with copies of the next stage's
        layers ``[b, kept.end)`` and of the first stage's (:mod:`master_core.copies`)."""
        lo, hi = 0 if kept.first else a, kept.end or b  # the layers loaded
        fields = {"model": self.model_ref, **await self._delivery(lo, hi)}
        h = link.hello
        tapes = self.stage_ends() if standby else ()
        kv = self.kv_budget(link, a, b, kept.end, kept.first, len(tapes))
        if tapes:
            fields |= {"tapes": tapes}
        if kept.end:
            fields |= {"copy_end": kept.end}
        if kept.first:
            fields |= {"copy_first": True}
        draft = self.draft if b == self.dims.num_layers else None  # the last stage holds it too ...
        if draft is not None:  # ... out of its KV budget, unless that would halve it (drafts are optional)
            held = self._kv_tokens(link, max(0, h.free_memory - draft.nbytes), lo, hi, len(tapes))
            if 2 * held >= kv:
                fields |= draft.fields()
                kv = held
            else:
                log.info("%s holds no draft model: it would take %d of its %d KV tokens", link.name, kv - held, kv)
        return Assign(
            epoch=epoch,
            layer_start=a,
            layer_end=b,
            num_layers=self.dims.num_layers,
            max_batch_tokens=self.config.max_batch_tokens,
            kv_tokens=kv,
            quantize=self.config.quantize,
            **fields,
        )

    def shadow_target(self) -> WorkerLink | None:
        """The standby member that keeps a copy of the open requests' caches (:mod:`master_core.shadow`;
        :meth:`~master_core.standby.Standbys.copier`), or None."""
        return self.standbys.copier()

    def stage_ends(self) -> tuple[int, ...]:
        """The layer ends of the serving pipeline's stages but the last (none while not serving)."""
        return tuple(s.assignment.layer_end for s in self.stages[:-1] if s.assignment is not None)

    def _stored_as_asked(self, link: WorkerLink, ready: Any) -> bool:
        """False when a quantized group's worker reports its layers (and any copy) at (about) full
        precision."""
        precision = Precision(self.config.quantize)
        asg = link.assignment
        if precision is Precision.NONE or asg is None:
            return True
        size, a, b = itemsize(link.hello.dtype), 0 if asg.copy_first else asg.layer_start, asg.copy_end or asg.layer_end
        outer = self.dims.stage_bytes(a, b, precision, size) - sum(
            self.dims.layer_bytes(i, precision, size) for i in range(a, b)
        )  # embeddings and head: never quantized
        full_layers = self.dims.stage_bytes(a, b, Precision.NONE, size) - outer
        return ready.weight_bytes - outer < 0.9 * full_layers

    def _place(self, live: list[WorkerLink]) -> Placement:
        """Pipeline order and ranges from each member's memory, measured speed and link.
        A link's announcement never changes, so a plan is remembered for its set of links
        (a join checks it, and the re-plan that may follow uses it).  No side effects."""
        if self._planned is not None and self._planned[0] == tuple(live):
            return self._planned[1]
        dims = self.dims
        size = max(itemsize(link.hello.dtype) for link in live)
        precision = Precision(self.config.quantize)
        members = planner_members([link.hello for link in live], dims.largest_layer_params, dims.hidden_size, size)
        try:
            plan = plan_pipeline(dims.shape(precision, size), members)
        except PlacementError as e:  # say at which precision it would fit
            fit = dims.lightest_fit(members, size)
            hint = (
                f"at --quantize {fit.value} it would fit"
                if fit is not None
                else "it does not fit even at --quantize int4"
            )
            raise PlacementError(f"{e} (at --quantize {precision.value}; {hint})") from e
        standby = {}
        for m, link in zip(members, live):
            if m.name not in plan.order:
                standby[link.name] = (
                    f"its link ({m.link_seconds * 1000:.0f} ms per step) is slower than the pipeline without it "
                    f"({plan.step_seconds * 1000:.0f} ms)"
                    if m.link_seconds > plan.step_seconds
                    else "the others hold the model as fast without it"
                )
        placement = Placement(tuple((live[int(name)], rng) for name, rng in zip(plan.order, plan.ranges)), standby)
        self._planned = (tuple(live), placement)
        return placement

    def describe(self) -> list[dict]:
        """Members as plain data (for /health and the dashboard)."""
        out = []
        for link in self.links:
            a = link.assignment if link in self.stages else None
            h = link.hello
            out.append(
                {
                    "name": link.name,
                    "peer": link.peer,
                    "path": member_path(link.peer).value,  # how its tunnel reaches this master
                    "device": h.device,
                    "device_name": h.device_name,
                    "free_memory": h.free_memory,
                    "gflops": round(h.gflops, 1),
                    "compute_capability": h.compute_capability,
                    "driver": h.driver,
                    "ram_total": h.ram_total,
                    "cpu_cores": h.cpu_cores,
                    "rtt_ms": round(h.rtt_ms, 2),
                    "link_mbps": round(h.link_mbps, 1),
                    "state": link.state.value,
                    "layers": [a.layer_start, a.layer_end] if a else None,
                    "precision": a.quantize if a else None,  # how its layers are stored (none, int8, int4)
                    "weight_bytes": link.ready.weight_bytes if a and link.ready else None,  # as the worker reports
                    "stage": self.stages.index(link) if link in self.stages else None,
                    "next_hop": self._next_hop(link),
                    "standby": self.standby.get(link.name) if link not in self.stages else None,
                    # a standby member that holds (or is loading) the whole model: it copies the caches
                    "whole_model": link not in self.stages
                    and self.standbys.kept_loaded(link) == (0, self.dims.num_layers),
                    "steps": link.steps,
                }
            )
        return out

    def _next_hop(self, link: WorkerLink) -> str | None:
        """How ``link``'s output reaches the next stage, for people (None: not a stage, or the last)."""
        i = self.stages.index(link) if link in self.stages else -1
        if len(self.stages) > 1 and i == len(self.stages) - 1:
            return f"back to the first stage: {self.loop_back.describe()}"
        return self.hops[i].describe() if 0 <= i < len(self.hops) else None

    def hop_lost(self, epoch: int, index: int, why: str) -> None:
        """Hop ``index`` of ``epoch``, direct until now, went down: relayed from now on."""
        if epoch == self.epoch and 0 <= index < len(self.hops) and self.hops[index].direct:
            self.hops[index] = Hop(False, reason=why)
            log.warning("hop %d (%s -> next stage) relayed from now on: %s", index, self.stages[index].name, why)

    def hop_moved(self, link: WorkerLink, routed: Routed) -> None:
        """``link``'s open hop of ``routed.epoch`` moved to another path by itself (off the
        relay, onto its next stage's direct address): the hop is described and costed as such."""
        if routed.epoch != self.epoch or link not in self.stages or not routed.direct:
            return
        i = self.stages.index(link)
        hop = Hop(True, routed.connect_ms, through=routed.through)
        if i == len(self.stages) - 1:
            if len(self.stages) > 1 and self.loop_back.direct:
                self.loop_back = hop
                log.info("loop-back hop (last stage -> first) moved: %s", hop.describe())
        elif self.hops[i].direct:
            self.hops[i] = hop
            log.info("hop %d (%s -> next stage) moved: %s", i, link.name, hop.describe())

    def loop_back_lost(self, epoch: int, why: str) -> None:
        """The loop-back hop of ``epoch`` went down: the master drives every step from now on."""
        if epoch == self.epoch and self.loop_back.direct:
            self.loop_back = Hop(False, reason=why)
            log.warning("loop-back hop (last stage -> first) given up: %s", why)


def _log_failure(task: asyncio.Task, what: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", what, exc_info=task.exception())
