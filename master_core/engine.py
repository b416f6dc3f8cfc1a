"""The serving loop: admit requests, run micro-batches through the pipeline, sample, stream.

Contract
--------
``Engine.submit(prompt_ids, params)`` checks limits (raising :class:`RequestRejected` with an
HTTP-like status) and returns a :class:`~master_core.request.Request` whose ``events`` queue
yields :class:`TokenEvent`s and one final :class:`FinishEvent`.  ``Engine.cancel`` stops a
request; its KV cache is freed on every stage as soon as no step of it is in flight.  The
engine owns its ids (requests and steps are numbered per engine, from 1).

``Engine.run()`` keeps ``slots`` micro-batch lanes busy (one per stage unless configured):
each lane asks the scheduler (:func:`~master_core.scheduler.next_microbatch`, the same call
the simulator makes) for a micro-batch of requests not already in flight, sends it through
the stages (:mod:`master_core.journey`: straight from stage i to i+1 where the group's hop is
direct, else relayed by the master through the tunnels, see :mod:`master_core.routes`), samples
the last stage's logits, and folds the results back.  Where every hop and the loop-back are
direct, the last stage draws the next tokens itself and feeds them straight back for up to
``scheduler.LOOP_STEPS`` steps (:meth:`Engine._loop_steps`); the master takes each token from its result.
New requests join at the next step; finished ones leave.  When the group changes epoch (a
worker left or joined) every running request is replayed from its tokens, so clients see no
error; when a standby member only takes over a lost stage's range, or the neighbours of the lost
stage (one or both) take its layers over beside their own (the group's repair), the other
stages keep their caches, the new or widened stages alone compute what they hold of those layers, from the
inputs kept (:mod:`master_core.rebuild`; the cached prefixes requests start from first), and
the requests go on where they were.  A request whose steps keep failing
fails alone.  A step given up on for want of an
answer (:class:`~master_core.link.StepLate`: the stages are alive) costs only what was in
flight: its requests go on from what every stage holds (``Request.computed``) under a newer
generation of their KV ids, which the stages hold to refuse the late step should it still come
(:mod:`worker_core.stage`); results of a generation given up on are not folded in.  A request
computed from scratch (a stage lost, a step refused, a preemption) gets a fresh KV id on the
stages (``Request.kv_id``): steps of the old one still on their way can only miss.
:mod:`master_core.kv_ledger` hands out, retires and frees those ids and keeps the cached
prefixes; the engine tells it when.  With speculation where the pipeline loops back, the last
stage drafts inside the loop (:mod:`master_core.loop_drafts`).
Admission (:func:`~master_core.scheduler.admit_and_preempt`) admits a request when every
stage's KV budget holds its prompt plus one token for each running request; a running request
that outgrows the budget preempts the youngest, which is recomputed later.  When ``run()``
is cancelled it cancels and awaits its lanes.

A group that cannot serve (too few members, or they cannot hold the model; not while a
pipeline is being built) keeps requests at most ``capacity_wait`` seconds: then every running
and queued request ends with an error event carrying ``retry_after`` (the API's 503 and
``Retry-After``); tokens already streamed stay valid.  At every epoch change the requests'
caches are freed on the stages that were serving, and a relay of the old epoch stops before
its next hop, so no stage keeps a cache for a pipeline that is gone.  Results of an old epoch
are dropped and counted (``stale_results``).

Nothing per request outlives it: ``running`` and the text streams drop a request when it
finishes (``held()`` counts what is held, for tests and diagnostics).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import torch

from worker_core.draft_model import DraftModel
from worker_core.tasks import end_tasks
from worker_core.wire import MAX_DRAFTS, ProtocolError, itemsize, logits_row_width

from .config import MasterConfig
from .copies import Copies
from .costs import CostSnapshot, shared_devices
from .group import Group
from .journey import Journey, Relay
from .kv_ledger import KVLedger, base, own
from .link import Expected, LinkGone, StepFailed, StepLate, WorkerLink
from .loop_drafts import HISTORY_TOKENS, fed_back, first_drafts, loop_draw, pending
from .rebuild import rebuild_stage, work_of
from .request import FinishEvent, Request, RequestState, SamplingParams, TokenEvent
from .sampling import next_token
from .scheduler import (
    Candidate,
    Chunk,
    KVView,
    Policy,
    admit_and_preempt,
    apart_lane,
    cycle_time,
    decode_lane,
    lane_count,
    lanes_open,
    loop_steps,
    microbatch_count,
    next_microbatch,
    policy,
)
from .shadow import Shadow
from .speculation import Speculator, apply_drafts, draft_caps, inputs, lookup_drafts, verify
from .standby import Rebuilt
from .text import TextStream
from .tuner import MicrobatchTuner

log = logging.getLogger("molink.engine")

PROFILE_REQUEST_ID = (1 << 62) + 1  # never a real request id
PROFILE_SIZES = (1, 16, 64, 1, 16, 64)  # tokens of the start-up profile's steps: two fits of three sizes
LANE_SUPERVISION = 0.2  # seconds between checks that every lane task is alive
IDLE_LANE_NAP = 0.5  # seconds a lane beyond the current micro-batch count sleeps before looking again
STEP_HISTORY = 4096  # step timelines kept for the dashboard's /dashboard/api/steps (a minute or more of steps)
NOTHING_TO_DO_NAP = 1.0  # seconds a lane with nothing to send waits for a wake-up at most


class RequestRejected(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Engine:
    def __init__(
        self, config: MasterConfig, group: Group, tokenizer: Any, eos_ids: set[int], drafter: DraftModel | None = None
    ) -> None:
        self.config = config
        self.group = group
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_length = group.dims.max_positions
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.policy: Policy = policy(config.policy, config.max_batch_tokens)
        self.tuner = MicrobatchTuner(self.policy.max_microbatches)  # K from measured delivery (slots())
        self._texts: dict[int, TextStream] = {}  # request id -> its detokenizer, until it finishes
        self._request_ids = itertools.count(1)
        self.relay = Relay(group, config.logits_topk)  # numbers the steps and takes them through the pipeline
        self._admitted = 0
        self.kv = KVLedger(group, f"model={config.model}", config.prefix_cache)  # KV ids, cached prefixes
        self.shadow = Shadow(group, lambda: self.running.values(), self.relay.step_ids)  # a standby's copy
        self.copies = Copies(  # the stages' copies of the next stages' layers
            group, lambda: self.running.values(), self.relay.step_ids, lambda kv_id: kv_id in self.kv.prefix
        )
        self._wake = asyncio.Event()  # a step ended or the load changed: busy lanes look again
        self._load = asyncio.Event()  # a request arrived, or the policy or pipeline changed: idle lanes look again
        self._profiled = asyncio.Event()  # the current pipeline's start-up profile is done
        self._replaced = asyncio.Event()  # the pipeline was replaced (a new epoch): run() looks again
        self.clock = time.monotonic
        self.direct = True  # use the group's direct hops (off: relay every hop; benchmarks compare both)
        self.loop_back = True  # let the last stage feed its drawn tokens straight back (benchmarks compare)
        self.loop_drafts = True  # ... and draft inside the loop-back (off: the master drafts; benchmarks compare)
        self.speculative = config.speculative or drafter is not None  # draft tokens (master_core.speculation)
        self.drafter = drafter  # a draft model for what prompt lookup finds nothing for (worker_core.draft_model)
        self.model_draft_trips = 0  # of the steps that carried drafts, those the draft model made
        self.model_drafted_tokens = 0
        self.model_accepted_tokens = 0
        self.draft_trips = 0  # steps that carried drafts
        self.loop_draft_trips = 0  # of those, the ones the last stage drafted inside the loop-back
        self.drafted_tokens = 0  # drafts sent
        self.accepted_tokens = 0  # of those, accepted
        self._looping: set[Expected] = set()  # steps the last stage feeds back, awaited by lanes
        self._looping_lanes = 0  # lanes whose micro-batch loops back now
        self._prefilling_lanes = 0  # lanes whose micro-batch carries prefill now
        self._decode_lanes = 0  # lanes whose micro-batch carries decode steps and does not loop back
        # counters for /health and the dashboard
        self.tokens_generated = 0
        self.requests_finished = 0
        self.preemptions = 0
        self.looped_steps = 0  # steps the last stage fed back to the first without the master
        self.stale_results = 0  # results of a pipeline (epoch) replaced while they were computed
        self.replays = 0  # requests computed again from scratch because a step of theirs failed
        self.rebuilt_requests = 0  # running requests kept through the loss of a stage (only it rebuilt)
        self.rebuilt_tokens = 0  # positions computed on replacement stages for them
        self.rebuilt_held = 0  # positions replacement stages held already (computed while standing by)
        self.prompt_tokens_total = 0  # prompt tokens of the requests that ended
        self.cached_tokens_total = 0  # of those, the ones reused from the prefix cache
        self._unservable_since: float | None = None  # when the group last stopped being able to serve
        self.recent: deque[dict] = deque(maxlen=256)  # finished requests: ttft, tpot, tokens
        self._finish_hooks: list[Callable[[dict], None]] = []
        self.steps: deque[dict] = deque(maxlen=STEP_HISTORY)  # the last steps' timelines (the dashboard's)
        self.on_step: Callable[[dict], None] | None = None  # told of every step's timeline (benchmarks)
        group.on_reset(self._on_reset)

    def on_finish(self, hook: Callable[[dict], None]) -> None:
        """Call ``hook(record)`` for every request that produced tokens and ended."""
        self._finish_hooks.append(hook)

    @property
    def profiled(self) -> bool:
        """The current pipeline's start-up profile is done (its costs are measured)."""
        return self._profiled.is_set()

    def held(self) -> dict[str, int]:
        """Entries per request the engine holds now: all zero when no request is alive."""
        held = {"running": len(self.running), "waiting": len(self.waiting), "text_streams": len(self._texts)}
        if self.drafter is not None:
            held["draft_caches"] = self.drafter.held()
        return held

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        if not prompt:
            raise RequestRejected(400, "the prompt is empty")
        if len(prompt) > self.config.max_prompt_tokens:
            raise RequestRejected(
                400,
                f"prompt has {len(prompt)} tokens; the limit is {self.config.max_prompt_tokens}",
                "context_length_exceeded",
            )
        if len(prompt) + params.max_tokens > self.context_length:
            raise RequestRejected(
                400,
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.context_length}",
                "context_length_exceeded",
            )
        if self.group.serving and len(prompt) + params.max_tokens > self.group.kv_tokens:
            raise RequestRejected(
                400, f"prompt + max_tokens exceeds the group's KV capacity of {self.group.kv_tokens} tokens"
            )
        if len(self.waiting) >= self.config.max_queued:
            raise RequestRejected(429, "too many queued requests; retry later", "rate_limit_exceeded")
        req = Request(next(self._request_ids), prompt=list(prompt), params=params)
        req.arrival = self.clock()
        self._texts[req.id] = TextStream(self.tokenizer, params.stop)
        self.waiting.append(req)
        self._wake.set()
        self._load.set()
        log.info("request %d queued: %d prompt tokens, max_tokens %d", req.id, len(prompt), params.max_tokens)
        return req

    def cancel(self, req: Request) -> None:
        if req.finished:
            return
        self._finish(req, RequestState.CANCELLED, "cancelled")

    def _finish(
        self, req: Request, state: RequestState, reason: str, error: str | None = None, retry_after: int | None = None
    ) -> None:
        if req.finished:
            return
        if req.state is RequestState.QUEUED and req in self.waiting:
            self.waiting.remove(req)
        req.move(state)
        req.finish_reason = reason
        req.finished_at = self.clock()
        text = self._texts.pop(req.id, None)
        tail = text.flush() if text is not None else ""
        if tail:
            req.events.put_nowait(TokenEvent(-1, tail))
        req.events.put_nowait(FinishEvent(reason, error, retry_after))
        if req.id in self.running:
            del self.running[req.id]
            if req.in_flight == 0:
                self.kv.free_everywhere(self.kv.release(req))
        if self.drafter is not None:
            self.drafter.free(req.id)
        self.requests_finished += 1
        self.prompt_tokens_total += len(req.prompt)
        self.cached_tokens_total += req.cached_tokens
        n = len(req.output)
        if req.first_token_at is not None:
            record = {
                "at": req.finished_at,
                "tokens": n,
                "ttft": req.first_token_at - req.arrival,
                "tpot": (req.finished_at - req.first_token_at) / max(1, n - 1),
            }
            self.recent.append(record)
            for hook in self._finish_hooks:
                hook(record)
        log.info("request %d %s (%s): %d tokens", req.id, state.value, reason, n)

    def _on_reset(self, previous: list[WorkerLink], rebuilt: Rebuilt | None) -> None:
        """Epoch change: the requests' caches are freed on the stages that were serving and the
        requests replayed from their tokens on the next pipeline, or, when only one stage is
        ``rebuilt`` (the group's repair), kept by the others (:meth:`KVLedger.reset`) and rebuilt
        on that stage before they go on (:meth:`_rebuild_lost`)."""
        self.kv.reset(self.running.values(), previous, rebuilt, PROFILE_REQUEST_ID)
        self.shadow.handover(rebuilt.index if rebuilt is not None else None)
        self.copies.handover()
        for exp in self._looping:  # steps fed back on the old pipeline: their lanes stop waiting now
            exp.fail(LinkGone("the pipeline was replaced"))
        self._profiled.clear()  # the new pipeline is profiled before it serves
        self._replaced.set()
        self._wake.set()
        self._load.set()

    def _admit(self) -> None:
        """Admission control and preemption (decided by the scheduler, done here)."""
        if not self.group.serving:
            return
        # what running requests hold of their own, and the cached prefixes they use, cannot be evicted
        running = [KVView(r.id, own(r), r.order, r.in_flight > 0) for r in self.running.values()]
        waiting = [(r.id, self.kv.prefill_need(r)) for r in self.waiting]
        pinned = self.kv.pinned()
        admit, preempt = admit_and_preempt(running, waiting, self.group.kv_tokens - pinned, self.config.max_running)
        for rid in preempt:
            req = self.running.pop(rid)
            req.move(RequestState.QUEUED)
            self.kv.free_everywhere(self.kv.release(req))  # preempted only with none of its steps out; kept cached
            self.waiting.appendleft(req)
            self.preemptions += 1
            log.info("request %d preempted (KV budget %d tokens); it will be recomputed", rid, self.group.kv_tokens)
        by_id = {r.id: r for r in self.waiting}
        for rid in admit:
            req = by_id[rid]
            self.waiting.remove(req)
            req.move(RequestState.RUNNING)
            if not req.kv_id:
                self.kv.restart(req)
            self.running[req.id] = req
            req.order = self._admitted
            self._admitted += 1
        self.kv.fit(self.running.values())

    # ------------------------------------------------------------------ the loop
    def set_policy(self, p: Policy) -> None:
        """Switch the scheduling policy (benchmarks and tests compare policies on one live group)
        and start it cold: every cached prefix no running request uses is forgotten, or the
        prompts an earlier policy computed would be served to the next one from the cache."""
        self.policy = p
        self.kv.forget_idle()
        self._wake.set()
        self._load.set()

    def costs(self) -> CostSnapshot | None:
        """The measured costs of the current pipeline, or None before they are known."""
        stages = self.group.stages
        stage_fits = [link.stage_cost.estimate() for link in stages]
        link_fits = [link.link_cost.estimate() for link in stages]
        if not stages:
            return None
        stage_known = [f for f in stage_fits if f is not None]
        link_known = [f for f in link_fits if f is not None]
        if len(stage_known) < len(stages) or len(link_known) < len(stages):
            return None
        dims = self.group.dims
        devices, slots = shared_devices([link.hello for link in stages])
        return CostSnapshot(
            stage_fixed=tuple(fixed for fixed, _ in stage_known),
            stage_per_token=tuple(per for _, per in stage_known),
            link_rtt=tuple(rtt for rtt, _ in link_known),
            link_bandwidth=tuple(bw for _, bw in link_known),
            hidden_bytes_per_token=dims.hidden_size * itemsize(stages[0].hello.dtype),
            logits_bytes_per_row=4 * logits_row_width(self.config.logits_topk, dims.vocab_size),  # float32
            devices=devices,
            device_slots=slots,
            direct=tuple(h.one_link for h in self.group.hops) if self.direct else (),
            loop_back=self._loops(),
            loop_back_relayed=bool(self.group.loop_back.through),
        )

    def replay_seconds(self) -> float | None:
        """About how long recomputing every running request's positions on the current pipeline
        would take (what a re-plan costs them), from the measured costs; None before they are
        known."""
        costs = self.costs()
        if costs is None:
            return None
        positions = sum(r.computed for r in self.running.values())
        return positions * sum(costs.stage_per_token) + len(self.running) * sum(costs.stage_fixed)

    def slots(self, costs: CostSnapshot | None) -> int:
        """Micro-batches to keep in flight now (configured, or the scheduler's choice: the cost
        model's count, tuned by what micro-batches deliver once the costs are measured)."""
        if self.config.microbatches:
            return self.config.microbatches
        k = microbatch_count(self.policy, costs, max(1, len(self.group.stages)), len(self.running))
        if not (self.policy.dynamic and self.policy.tune) or costs is None:
            return k
        return self.tuner.choose(k, self._tuning_key(), len(self.running))

    def _tuning_key(self) -> tuple[int, int]:
        """The load the tuner's measurements belong to: this pipeline, this many requests."""
        return (self.group.epoch, len(self.running))

    async def run(self) -> None:
        """Keep one lane task per micro-batch slot alive until cancelled; profile each new
        pipeline, and rebuild a repaired one, as soon as it serves (the lanes wait for that; the
        supervision's period is for the lanes alone).  Cancelled: cancel every lane and wait for them."""
        lanes: dict[int, asyncio.Task] = {}
        profiled = -1
        background: set[asyncio.Task] = {asyncio.create_task(self.shadow.run()), asyncio.create_task(self.copies.run())}
        for task in background:
            task.add_done_callback(background.discard)
        try:
            while True:
                if self.group.serving and profiled != self.group.epoch:
                    profiled = self.group.epoch
                    if await self._rebuild_lost():  # the other stages' costs are known: serve at once
                        self._profiled.set()
                        task = asyncio.create_task(self._profile())  # the new stage's costs, while serving
                        background.add(task)
                        task.add_done_callback(background.discard)
                    else:
                        await self._profile()
                self._check_capacity(self.clock())
                for i in range(lane_count(self.policy)):
                    t = lanes.get(i)
                    if t is not None and t.done() and not t.cancelled() and t.exception() is not None:
                        log.error("lane %d crashed: %r", i, t.exception())
                    if t is None or t.done():
                        lanes[i] = asyncio.create_task(self._lane(i))
                # no sooner than that, unless another pipeline serves: a repaired one's streams wait for its rebuild
                waiter = asyncio.ensure_future(self._another_pipeline(profiled))
                try:
                    await asyncio.wait({waiter}, timeout=LANE_SUPERVISION)
                finally:
                    waiter.cancel()
        finally:
            await end_tasks([*lanes.values(), *background])  # lanes await wait_for: a single cancel can be swallowed

    async def _another_pipeline(self, profiled: int) -> None:
        """Return once the group serves a pipeline other than epoch ``profiled``'s."""
        while not (self.group.serving and self.group.epoch != profiled):
            if not self.group.serving:
                await self.group.wait_serving()
                continue
            self._replaced.clear()  # serving epoch ``profiled``: wait for its replacement
            await self._replaced.wait()

    def _check_capacity(self, now: float) -> None:
        """End every request with a 503-type error once the group has been unable to serve
        (and is not building a pipeline) for ``capacity_wait`` seconds."""
        g = self.group
        if g.serving or g.state.building:
            self._unservable_since = None
            return
        if self._unservable_since is None:
            self._unservable_since = now
        if now - self._unservable_since < self.config.capacity_wait or not (self.running or self.waiting):
            return
        why = f"the group cannot serve now: {g.problem or 'no pipeline'}"
        for req in [*self.running.values(), *self.waiting]:
            self._finish(req, RequestState.FAILED, "error", why, self.config.retry_after)

    async def _rebuild_lost(self) -> bool:
        """After a repair (one stage replaced, or its layers taken over by one neighbour or both,
        :meth:`_on_reset`): compute on those stages only the positions every other stage kept
        (:mod:`master_core.rebuild`), of the replaced stage's layers or of the layers each
        neighbour took over, in pipeline order (the second neighbour's input is what the first
        computed); the requests then go on where they were.  If that fails they are computed from
        scratch.  True when a repaired pipeline was rebuilt (it then serves before its start-up
        profile ends)."""
        rep, self.kv.repairing = self.kv.repairing, None
        if rep is None:
            return False
        stages, epoch, lost = list(self.group.stages), self.group.epoch, rep.rebuilt
        jobs = [(w.index, w.layers) for w in lost.widened] if lost.index is None else [(lost.index, None)]
        for link in stages:
            link.free(rep.free_later)
        reqs = [r for rid, kv in rep.kept.items() if (r := self.running.get(rid)) is not None and r.kv_id == kv]
        new = stages[lost.index] if lost.index is not None and 0 <= lost.index < len(stages) else None
        held = self.shadow.take(new) if new is not None else {}
        if len(jobs) == 1 and (taken := jobs[0][1]) is not None and 0 <= jobs[0][0] < len(stages):
            held = self.copies.take(stages[jobs[0][0]], taken)  # the layers it kept a copy of
        work = work_of(reqs, held)  # the cached prefixes they start from first
        kept = {w.kv_id for w in work}
        if new is not None and (orphans := [kv for kv in held if kv not in kept]):
            new.free(orphans)  # copied while it stood by, of requests that ended since
        had = sum(w.start - w.base_len for w in work)
        t0 = self.clock()
        others = [x for i, x in enumerate(stages) if i != lost.index]
        args = (self.relay.step_ids, self.config.max_batch_tokens, self.group.dims.hidden_size)
        rebuilt = 0
        try:
            if not all(0 <= index < len(stages) for index, _ in jobs) or others != rep.survivors:
                raise LinkGone("the pipeline is not the repaired one")
            for index, layers in jobs:
                rebuilt += await rebuild_stage(stages, epoch, index, work, *args, layers)
        except (LinkGone, StepFailed, ProtocolError) as e:
            where = ", ".join(str(index) for index, _ in jobs)
            log.warning("rebuilding stage(s) %s failed (%s); %d request(s) computed from scratch", where, e, len(reqs))
            if self.group.epoch == epoch:  # the cached prefixes are not all on that stage
                self.kv.free_everywhere(self.kv.prefix.clear())
            for r in reqs:
                if r.id in self.running and self.group.epoch == epoch:
                    self.replays += 1
                    self.kv.restart(r)
                    self.kv.free_everywhere(self.kv.release(r, stale_only=True))
            return False
        self.rebuilt_requests += len(reqs)
        self.rebuilt_tokens += rebuilt
        self.rebuilt_held += had
        what = ", ".join(
            f"stage {i}" + ("" if ls is None else f" (layers [{ls[0]}, {ls[1]}) it took over)") for i, ls in jobs
        )
        log.info(
            "%s rebuilt in %.2f s: %d position(s) of %d request(s), %d held already; the others kept theirs",
            what,
            self.clock() - t0,
            rebuilt,
            len(reqs),
            had,
        )
        return True

    async def _profile(self) -> None:
        """Start-up profile: a few steps of different sizes give the cost model its first fit."""
        epoch, stages = self.group.epoch, list(self.group.stages)
        rid = PROFILE_REQUEST_ID
        t0 = self.clock()
        try:
            for n in PROFILE_SIZES:
                n = max(1, min(n, self.config.max_batch_tokens, self.group.kv_tokens // 2))
                chunk = Chunk(rid, 0, n, True)
                await self.relay.send(stages, epoch, [chunk], {rid: [1] * n}, direct=False)  # measures every link
        except (LinkGone, StepFailed, ProtocolError) as e:
            log.warning("start-up profile failed: %s", e)
        finally:
            for link in stages:  # whatever happened: no stage keeps the profile's cache
                link.free([rid])
            if self.group.epoch == epoch:  # not for a pipeline that replaced this one meanwhile
                self._profiled.set()
            log.info("pipeline of epoch %d profiled in %.2f s", epoch, self.clock() - t0)

    async def _lane(self, index: int) -> None:
        while True:
            await self.group.wait_serving()
            await self._profiled.wait()
            most = self.policy.max_microbatches  # the slots and the looping lanes together (lanes_open)
            if index >= lanes_open(most, 0, True, self._prefilling_lanes, most):  # closed, whatever the slots
                await self._nap(IDLE_LANE_NAP, self._load)
                continue
            costs = self.costs()  # once per micro-batch: the count and the plan use the same fit
            slots = self.slots(costs)
            self._admit()  # first: an arrival admitted may open the lane for prefill apart
            cands = self._candidates()
            apart = apart_lane(self.policy, costs, cands)
            if index >= lanes_open(slots, self._looping_lanes, apart, self._prefilling_lanes, most) and index > 0:
                await self._nap(IDLE_LANE_NAP, self._load)  # not needed now: steps ending do not concern it
                continue
            chunks = self._plan(costs, slots, cands)
            if not chunks or not self.group.stages:
                await self._nap(NOTHING_TO_DO_NAP)
                continue
            reqs = [self.running[c.request_id] for c in chunks]
            key, prefill = self._tuning_key(), any(c.length > 1 for c in chunks)
            # the master drafts (the loop-back does not draft, or the last stage holds no draft
            # model yet): every step first, as drafting decides whether it loops; else a loop drafts
            on_master = self.speculative and not self._drafts_in_loop
            loop, ks, reserve = (0, [], []) if on_master else self._loop_steps(chunks, reqs, costs, slots)
            if self.speculative and not loop:  # the master drafts (and verifies) this step
                chunks, reqs = await self._draft(chunks, reqs)
                if not chunks:
                    continue
                if on_master:
                    loop, ks, reserve = self._loop_steps(chunks, reqs, costs, slots)
            elif any(ks):  # the loop's first step drafts too, from the same lookup, here
                chunks = first_drafts(chunks, reqs, ks, loop, self.context_length, self.config.max_batch_tokens)
            epoch, stages = self.group.epoch, list(self.group.stages)  # after drafting: it may await
            for i, (c, r) in enumerate(zip(chunks, reqs)):
                r.scheduled = c.start + c.length + loop
                r.written = c.start + c.length + (reserve[i] if loop else 0)
                r.in_flight += 1
            looped: list[Expected] = []
            awaited = 0
            kv_ids = {r.id: r.kv_id for r in reqs}  # a request restarted meanwhile has another
            gens = {r.id: r.kv_gen for r in reqs}  # one resumed or restarted meanwhile has a newer one
            decoding = decode_lane(chunks, loop)
            self._looping_lanes += bool(loop)
            self._prefilling_lanes += prefill
            self._decode_lanes += decoding
            counted = prefill  # counted among the lanes carrying prefill until its first step is back
            try:
                sent = [replace(c, request_id=r.kv_id) for c, r in zip(chunks, reqs)]
                tokens = {r.kv_id: inputs(r, c) for c, r in zip(chunks, reqs)}
                history = HISTORY_TOKENS // max(1, sum(1 for k in ks if k))  # shared by those that draft
                by_model = [self._loop_model_k(r, k, loop) for r, k in zip(reqs, ks)]
                draws = tuple(
                    loop_draw(r, c, k, self.context_length, history, mk)
                    for c, r, k, mk in zip(chunks, reqs, ks, by_model)
                )
                carried = [pending(c, r) for c, r in zip(chunks, reqs)]  # the drafts the first step carries
                topk = self._topk(reqs)
                marks = {r.kv_id: (r.kv_gen, base(r, c.start)) for c, r in zip(chunks, reqs)}
                drop = self.kv.take_drops()
                journey = self.relay.send(
                    stages, epoch, sent, tokens, self.direct, loop, draws, topk=topk, marks=marks, drop=drop
                )
                went = await self._step(epoch, chunks, reqs, gens, key, slots, prefill, journey, topk)
                self._prefilling_lanes -= counted  # the steps it loops carry no prefill
                counted = False
                looped = went.looped if went is not None else []
                self._looping.update(looped)
                batch = chunks
                for exp in looped:  # the last stage feeds the tokens it drew straight back
                    awaited += 1
                    assert went is not None
                    # the engine folds results in by request id; the stages know the KV ids the step
                    # was sent under (a continuation relayed from a broken hop names them)
                    live = [r.id in self.running and r.kv_gen == gens[r.id] for r in reqs]
                    batch, carried = fed_back(batch, carried, went, reqs, live)
                    if went.draft_seconds:  # the last stage's running measure of its draft model
                        stages[-1].draft_seconds = went.draft_seconds
                    on_stages = [replace(b, request_id=s.request_id) for b, s in zip(batch, sent)]
                    journey = self.relay.looped(
                        stages, epoch, on_stages, exp, {k: (g, 0) for k, (g, _) in marks.items()}
                    )
                    went = await self._step(epoch, batch, reqs, gens, key, slots, False, journey, topk, awaited)
                    if went is None:
                        break
                    self.looped_steps += 1
                    if went.legs > 1:  # a hop went down on its way: relayed from there, nothing loops back
                        break
                    if not any(r.id in self.running for r in reqs):  # all ended (stop, cancel): free them now;
                        break  # a step still looping then finds no cache on some stage and goes no further
            finally:
                self._looping_lanes -= bool(loop)
                self._prefilling_lanes -= counted
                self._decode_lanes -= decoding
                for exp in looped[awaited:]:  # not awaited: a step failed, or the lane was cancelled
                    exp.abandon()
                self._looping.difference_update(looped)
                for r in reqs:
                    r.in_flight -= 1
                    given_up = loop and not r.in_flight and r.scheduled > r.computed  # fed-back steps
                    if given_up and r.id in self.running and r.kv_id == kv_ids[r.id]:
                        r.scheduled = r.computed  # sent again; any of them still on its way is refused
                        r.kv_gen += 1  # by the stages (a newer generation)
                done = [i for r in reqs if r.in_flight == 0 for i in self.kv.release(r, r.id in self.running)]
                if done and self.group.epoch == epoch:
                    self.kv.free_everywhere(done)
                self._wake.set()

    async def _step(
        self,
        epoch: int,
        chunks: list[Chunk],
        reqs: list[Request],
        gens: dict[int, int],
        key: tuple[int, int],
        slots: int,
        prefill: bool,
        journey: Awaitable[Journey],
        topk: int,
        fed: int = 0,
    ) -> Journey | None:
        """Await one micro-batch step's journey and fold its logits in (and the tokens the last
        stage drew, when it fed them back).  ``gens``: request id -> the generation of its KV id
        the step was sent under; ``fed``: which step of a loop-back this is (0: the master sent
        it).  Returns the journey, or None when it failed (its requests resume or replay; what it
        would have looped back is given up)."""
        failure: Exception | None = None
        went: Journey | None = None
        began = self.clock()
        try:
            went = await journey
        except (LinkGone, StepFailed, ProtocolError) as e:
            failure = e
        except Exception as e:  # a bug in the relay: these requests replay (then fail), the lane lives
            log.exception("relay of a micro-batch failed")
            failure = e
        load = (len(self.waiting), len(self.running), slots, self._looping_lanes, fed)
        self.steps.append(_timeline(began, self.clock(), chunks, went, failure, *load))
        if self.on_step is not None:
            self.on_step(self.steps[-1])
        try:
            if failure is not None or went is None:
                self._step_failed(epoch, chunks, gens, failure or RuntimeError("no result"))
                return None
            before = self.tokens_generated
            self._apply(epoch, chunks, went.logits, went.tokens, topk, gens)
            self.tuner.observe(self.clock(), key, slots, self.tokens_generated - before, prefill)
        except Exception as e:  # a bug must cost these requests, not the lane or anyone else
            log.exception("micro-batch bookkeeping failed")
            for r in reqs:
                self._finish(r, RequestState.FAILED, "error", f"internal error: {type(e).__name__}")
            for exp in went.looped if went is not None else []:
                exp.abandon()
            return None
        return went

    def _topk(self, reqs: list[Request]) -> int:
        """The logits a step asks of the last stage: the configured top-k, or whole rows when a
        request of the micro-batch is constrained (its grammar may allow none of the top k)."""
        return 0 if any(r.constraint is not None for r in reqs) else self.config.logits_topk

    async def _draft(self, chunks: list[Chunk], reqs: list[Request]) -> tuple[list[Chunk], list[Request]]:
        """The micro-batch with drafts added to its decode steps (:mod:`master_core.speculation`),
        within the step's token budget and the KV every stage has free (evicting idle cached
        prefixes for them): prompt lookup's, else the draft model's.  While the draft model
        works (in its thread) the requests count as in flight, so no other lane takes them; a
        request that ended, was restarted or moved meanwhile leaves the micro-batch."""
        for r in reqs:
            if r.spec is None:
                r.spec = Speculator()
        step_room = self.config.max_batch_tokens - sum(c.length for c in chunks)
        kv_room = self.kv.room(self.running.values())
        caps = draft_caps(chunks, reqs, step_room, kv_room, self.context_length)
        proposals = lookup_drafts(reqs, caps)
        if self.drafter is not None:  # where lookup found nothing, and the draft model pays
            for i, (cap, p) in enumerate(zip(caps, proposals)):
                spec = reqs[i].spec
                if cap and not p and spec is not None:
                    caps[i] = min(cap, spec.model_budget())
        wanted = [i for i, (cap, p) in enumerate(zip(caps, proposals)) if cap and not p] if self.drafter else []
        by_model = [False] * len(chunks)
        if self.drafter is not None and wanted:
            epoch = self.group.epoch
            before = [_draft_mark(r) for r in reqs]
            for r in reqs:
                r.in_flight += 1
            try:
                made = await self.drafter.propose([(reqs[i].id, reqs[i].tokens, caps[i] or 0) for i in wanted])
            finally:  # cancelled too: what ended meanwhile is freed here (its _finish left it to this step)
                for r in reqs:
                    r.in_flight -= 1
                keep = [i for i, r in enumerate(reqs) if r.id in self.running and _draft_mark(r) == before[i]]
                gone = [r for i, r in enumerate(reqs) if i not in keep]
                done = [k for r in gone if r.in_flight == 0 for k in self.kv.release(r, r.id in self.running)]
                if done and self.group.epoch == epoch:
                    self.kv.free_everywhere(done)
                for r in gone:
                    if r.spec is not None:
                        r.spec.pending = ()
                if gone:
                    self._wake.set()
            for i, drafts in zip(wanted, made):
                proposals[i], by_model[i] = drafts, bool(drafts)
            if gone:
                chunks, reqs = [chunks[i] for i in keep], [reqs[i] for i in keep]
                proposals, by_model = [proposals[i] for i in keep], [by_model[i] for i in keep]
            kv_room = self.kv.room(self.running.values())  # others may have taken some meanwhile
        out, added = apply_drafts(chunks, reqs, proposals, step_room, kv_room, by_model)
        if added:
            self.kv.fit(self.running.values(), added)
        return out, reqs

    def _loop_steps(
        self, chunks: list[Chunk], reqs: list[Request], costs: CostSnapshot | None, slots: int
    ) -> tuple[int, list[int], list[int]]:
        """How many steps after this one the last stage may feed back to the first on its own
        (``Step.loop``, drawing each token as the master would: ``wire.Draw``), skipping the
        master's two crossings per token: only where every hop and the loop-back are direct,
        no request of the micro-batch has presence or frequency penalties (they need the output,
        which the last stage does not see), each gets a new token from this step, and a lane is
        left for the master (a looping lane takes no slot, :func:`~master_core.scheduler.lanes_open`:
        another lane admits arrivals and prefills them meanwhile), and, once the looping lanes fill
        the ``slots``, another loop would not only wait for the busiest resource (the streams then
        go together on the master's lanes, :func:`~master_core.scheduler.loop_steps`, with the
        ``costs``).  Bounded by each request's
        ``max_tokens`` and context, and by the KV the running requests leave free.  With
        speculation by prompt lookup the last stage drafts inside the loop: per request, the
        drafts it may make per step (its :class:`~master_core.speculation.Speculator`'s budget, cut
        to the free KV); and per request the KV positions the loop may write beyond this step
        (reserved here).  (0, [], []) when it does not loop."""
        if not self._loops():
            return 0, [], []
        if self.speculative and not self._drafts_in_loop and any(r.spec is not None and r.spec.drafting for r in reqs):
            return 0, [], []  # the master drafts (its lookup or draft model): its steps are verified here
        for c, r in zip(chunks, reqs):
            p = r.params
            if p.presence_penalty or p.frequency_penalty:  # the last stage does not see the output
                return 0, [], []
            if r.constraint is not None:  # constrained requests are master-driven: the grammar lives here
                return 0, [], []
            if not c.want_logits or c.rows != 1 or c.start + c.length != len(r.tokens):
                return 0, [], []
        left = [min(r.params.max_tokens - len(r.output), self.context_length - len(r.tokens)) for r in reqs]
        room = self.kv.room(self.running.values())
        n = max(0, min(loop_steps(self.policy, costs, self._looping_lanes, slots, left), room // max(1, len(chunks))))
        if not n:
            return 0, [], []
        ks = [self._loop_k(r, n) for r in reqs]

        def reserve() -> list[int]:  # positions each may write: up to 1 + k per step, drafts beyond
            return [min(lf, (n + 1) * (1 + k)) + k for lf, k in zip(left, ks)]

        while sum(reserve()) > room and any(ks):
            ks[ks.index(max(ks))] -= 1
        self.kv.fit(self.running.values(), sum(reserve()))  # evicting idle prefixes for it
        return n, ks, reserve()

    def _loop_k(self, r: Request, steps: int) -> int:
        """Drafts the last stage may make per fed-back step of ``r`` (0: none): speculation
        drafting inside the loop-back, at the request's budget
        (:meth:`~master_core.speculation.Speculator.budget`).  With drafting switched off, the
        loop's ``steps`` count towards its re-probe as the steps they are."""
        if not (self.speculative and self._drafts_in_loop):
            return 0
        if r.spec is None:
            r.spec = Speculator()
        return min(r.spec.budget(1 + steps), MAX_DRAFTS)

    def _loop_model_k(self, r: Request, k: int, steps: int) -> int:
        """Of ``r``'s ``k`` drafts per fed-back step, those the last stage's draft model may make
        where its prompt lookup finds nothing (its own budget:
        :meth:`~master_core.speculation.Speculator.model_budget`); 0 without one.  Switched off,
        the loop's ``steps`` count towards its re-probe as the steps they are."""
        if not k or not self._stage_draft_seconds or r.spec is None:
            return 0
        return min(k, r.spec.model_budget(1 + steps))

    @property
    def _stage_draft_seconds(self) -> float:
        """Seconds a drafted token costs the last stage's draft model (0: it holds none): as it
        last measured them while drafting, else as its warm-up did (``Ready.draft_seconds``)."""
        stages = self.group.stages
        ready = stages[-1].ready if stages else None
        if ready is None or self.drafter is None or not ready.draft_seconds:
            return 0.0
        return stages[-1].draft_seconds or ready.draft_seconds

    @property
    def _drafts_in_loop(self) -> bool:
        """Speculation drafts inside the loop-back where it loops (the last stage's prompt
        lookup, and its copy of the draft model where the master has one), not on the master
        (while the last stage holds no draft model the master's drafts; benchmarks may turn it off)."""
        return self.loop_drafts and (self.drafter is None or self._stage_draft_seconds > 0)

    def _loops(self) -> bool:
        """Does the pipeline loop back (every hop and the loop-back direct, and allowed)?"""
        g = self.group
        return self.loop_back and self.direct and g.loop_back.direct and all(h.direct for h in g.hops)

    async def _nap(self, seconds: float, event: asyncio.Event | None = None) -> None:
        """Sleep until ``event`` is set (default: something changes, a step ends or a request
        arrives) or ``seconds`` pass."""
        event = event or self._wake
        event.clear()
        # asyncio.wait, not wait_for: on Python < 3.12 wait_for can swallow a cancellation that
        # arrives as the wake-up does, and a cancelled lane would then nap on forever
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()

    def _candidates(self) -> list[Candidate]:
        """The running requests as the scheduler sees them."""
        return [
            Candidate(r.id, r.scheduled, len(r.tokens), r.order, r.in_flight, r.computed) for r in self.running.values()
        ]

    def _plan(self, costs: CostSnapshot | None, slots: int, cands: list[Candidate]) -> list[Chunk]:
        return next_microbatch(
            self.policy,
            costs,
            cands,
            slots,
            prefilling=self._prefilling_lanes,
            decode_lanes=self._decode_lanes,
        )

    def _apply(
        self,
        epoch: int,
        chunks: list[Chunk],
        logits: torch.Tensor,
        drawn: tuple[int, ...] = (),
        topk: int = -1,
        gens: dict[int, int] | None = None,
    ) -> None:
        """Fold a step's logits in: each finished row gives its request a token, drawn here
        (within its grammar, if it has one), or the one the last stage drew and fed back
        (``drawn``, one per row).  ``topk``: of the step's rows (-1: the configured one); whole
        rows of unconstrained requests are cut to the configured top-k here, as the last stage
        would have, so a request's tokens do not depend on whom it was batched with.  ``gens``:
        the generation each request's KV id had when the step went; a request resumed or
        restarted since takes nothing from it."""
        topk = self.config.logits_topk if topk < 0 else topk
        if self.group.epoch != epoch:
            self.stale_results += 1
            return  # computed on a pipeline that no longer exists; the requests are replayed
        row = 0
        now = self.clock()
        for c in chunks:
            req = self.running.get(c.request_id)
            first, row = row, row + c.logit_rows
            if req is None or req.finished or req.scheduled < c.start + c.length:
                continue  # gone, or reset for a replay meanwhile
            if gens is not None and gens.get(req.id) != req.kv_gen:
                continue  # sent under a generation given up on since
            req.retries = 0
            if c.rows > 1:  # drafts to verify: the request goes on from the first one rejected
                self._verify(req, c, logits[first:row], topk, now, drawn[first:row] if drawn else ())
                continue
            req.computed = max(req.computed, c.start + c.length)
            if not c.want_logits or req.computed < len(req.tokens):
                continue
            self._take(req, logits[row - 1], topk, drawn[row - 1] if drawn else None, now)

    def _take(self, req: Request, row: torch.Tensor, topk: int, drawn: int | None, now: float) -> int | None:
        """Give ``req`` its next token from one row of logits: drawn here (within its grammar,
        if it has one), or ``drawn`` by the last stage.  Returns it, or None when the request
        ended before or with it (or failed)."""
        try:
            s = next_token(
                row, topk, self.config.logits_topk, req.params, req.constraint, drawn, req.seed, req.tokens, req.output
            )
            if req.constraint is not None and s.token_id not in self.eos_ids:
                req.constraint.advance(s.token_id)
            req.tokens.append(s.token_id)
            self.tokens_generated += 1
            if req.first_token_at is None:
                req.first_token_at = now
            self._emit(req, s.token_id, s.logprob, s.top_logprobs)
        except Exception as e:  # a bug costs this request only
            log.exception("request %d: sampling or streaming failed", req.id)
            self._finish(req, RequestState.FAILED, "error", f"internal error: {type(e).__name__}")
            return None
        return None if req.finished else s.token_id

    def _verify(
        self, req: Request, c: Chunk, rows: torch.Tensor, topk: int, now: float, drawn: tuple[int, ...] = ()
    ) -> None:
        """Fold a speculative step in (:mod:`master_core.speculation`): row j draws the token at
        ``len(tokens)`` (or takes the one the last stage drew, ``drawn[j]``, inside the loop-back),
        kept while it equals draft j; the KV is valid up to the last accepted draft, and the next
        step starts there (the stages truncate the rest)."""
        spec = req.spec
        drafts = spec.pending if spec is not None else ()
        if spec is None or len(drafts) + 1 != c.rows or c.start + 1 != len(req.tokens):
            self._finish(req, RequestState.FAILED, "error", "internal error: a speculative step lost its drafts")
            return
        spec.pending = ()
        accepted = verify(drafts, lambda j: self._take(req, rows[j], topk, drawn[j] if drawn else None, now))
        req.computed = c.start + 1 + accepted
        req.scheduled = req.computed
        costs = self.costs()
        # the model's drafts cost its time too: (n - 1) tokens drafted one after another
        looped = spec.in_loop  # a trip inside the loop-back crosses no master
        made_by = self._stage_draft_seconds if looped else self.drafter.token_seconds if self.drafter else 0.0
        per_draft = made_by if spec.by_model and made_by else None
        trip = (lambda n: cycle_time(costs, n, n, looped)[0]) if costs is not None else None
        spec.observe(len(drafts), accepted, trip, per_draft if trip is not None else None)
        self.draft_trips += 1
        self.loop_draft_trips += spec.in_loop
        self.drafted_tokens += len(drafts)
        self.accepted_tokens += accepted
        if spec.by_model:
            self.model_draft_trips += 1
            self.model_drafted_tokens += len(drafts)
            self.model_accepted_tokens += accepted

    def _emit(self, req: Request, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        p = req.params
        is_eos = token in self.eos_ids and not p.ignore_eos
        if is_eos or token in p.stop_token_ids:
            req.events.put_nowait(TokenEvent(token, "", logprob, top))
            self._finish(req, RequestState.DONE, "stop")
            return
        delta, stopped = self._texts[req.id].push(token)
        req.events.put_nowait(TokenEvent(token, delta, logprob, top))
        if stopped:
            self._finish(req, RequestState.DONE, "stop")
        elif len(req.output) >= p.max_tokens or len(req.tokens) >= self.context_length:
            self._finish(req, RequestState.DONE, "length")

    def _step_failed(self, epoch: int, chunks: list[Chunk], gens: dict[int, int], error: Exception) -> None:
        """A step failed: its requests go on from what every stage holds when it was only given
        up on (:class:`StepLate`), else from scratch (a stage refused it or is gone: its cache
        cannot be trusted); a request whose steps keep failing fails."""
        late = isinstance(error, StepLate)
        if self.group.epoch != epoch:  # the reset decided already how its requests go on
            log.info("a step of a replaced pipeline failed (%s)", error)
            return
        log.warning("step failed (%s); %s %d request(s)", error, "resuming" if late else "replaying", len(chunks))
        for c in chunks:
            req = self.running.get(c.request_id)
            if req is None or gens.get(req.id) != req.kv_gen:
                continue  # gone, or resumed or restarted already (another of its steps failed first)
            req.retries += 1
            if req.retries > self.config.step_retries:
                self._finish(req, RequestState.FAILED, "error", f"pipeline step failed {req.retries} times: {error}")
            elif late:
                self.kv.resume(req)
            else:
                self.replays += 1
                self.kv.restart(req)  # replay from scratch, once its other chunks are out

    # ------------------------------------------------------------------ helpers
    async def generate(self, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """Run one request to the end: (token ids, text, finish reason).  For tests and tools."""
        req = self.submit(prompt, params)
        text = []
        while True:
            ev = await req.events.get()
            if isinstance(ev, FinishEvent):
                if ev.reason == "error":
                    raise RuntimeError(ev.error)
                return req.output, "".join(text), ev.reason
            text.append(ev.text)


def _timeline(
    began: float,
    ended: float,
    chunks: list[Chunk],
    went: Journey | None,
    failure: Exception | None,
    waiting: int,
    running: int,
    slots: int,
    looping: int,
    fed: int,
) -> dict:
    """One step's record for :attr:`Engine.on_step`: when it went and came back, what it carried,
    each stage's compute and the seconds it held the step (from its arrival to handing it on),
    the queue wait of the stages that ended its runs, the load (requests
    waiting and running, the micro-batches the lanes kept in flight, the lanes looping back) and
    which step of its loop-back it was (0: the master sent it)."""
    return {
        "began": began,
        "ended": ended,
        "decodes": sum(1 for c in chunks if c.length == 1 or c.rows > 1),
        "prefill_tokens": sum(c.length for c in chunks if c.length > 1 and c.rows == 1),
        "drafts": sum(c.rows - 1 for c in chunks),
        "computes": list(went.computes) if went is not None else [],
        "held": list(went.held) if went is not None else [],
        "queued": went.queued if went is not None else 0.0,
        "legs": went.legs if went is not None else 0,
        "failed": None if failure is None else f"{type(failure).__name__}: {failure}"[:200],
        "waiting": waiting,
        "running": running,
        "slots": slots,
        "looping": looping,
        "fed": fed,
    }


def _draft_mark(r: Request) -> tuple[int, int, int, int, bool]:
    """What must not change while a request waits for its drafts for its step to still go."""
    return (r.kv_id, r.kv_gen, r.scheduled, len(r.tokens), r.finished)
