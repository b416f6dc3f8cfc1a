"""The master's end of one worker tunnel.

Contract
--------
A :class:`WorkerLink` wraps an accepted WebSocket whose first frame was a valid ``Hello``.
Lifecycle (``LinkState``): ``CONNECTING -> READY -> DRAINING -> GONE`` (READY may go back to
CONNECTING when a new assignment is being loaded; any state may go to GONE); :meth:`WorkerLink.move`
is the only way to change it and refuses any other transition.  DRAINING: the worker asked
to leave once the running requests end (``Leave(finish=True)``); it keeps serving the current
pipeline but no new placement may choose it.  A ``Leave`` from the worker is handed to
``on_leave(link, finish)`` (set by the group; without one the link closes at once).  ``assign``
sends an ``Assign`` and waits for the matching ``Ready``; ``route`` sends a ``Route`` and waits
for the ``Routed``; ``call`` sends a ``Step`` and waits for its ``Result`` (from this stage, or,
for a step forwarded over direct hops, from the stage that ends its journey); ``recall`` sends a
``Recall`` and returns the rows the stage kept; ``fill`` sends a ``Fill`` and awaits its answer.
``run_reader`` reads frames until the tunnel ends: a malformed frame or
an unexpected message is a :class:`~worker_core.wire.ProtocolError`, which closes this link
(with a log line) and fails everything waiting on it with :class:`LinkGone`; nothing else in
the process is affected.  ``close_with(reason, code)`` ends a link; the WebSocket close code
is chosen by the caller from what happened (:class:`~worker_core.wire.CloseCode`), never from
the reason's text.  Every task a link starts is kept and awaited by ``wait_closed()``.  A
``Failure`` naming a step fails that step's caller with :class:`StepFailed`.  Measured per
link: compute seconds of the last steps, the round trip beyond compute, and bytes each way.

Liveness (the master's own; aiohttp's tunnel heartbeat is off): ``run_reader`` also pings the
worker every ``PING_INTERVAL`` and judges the link by the rule of :mod:`master_core.liveness`
(silence beyond the link's own pace, a stuck compute behind a live loop, a step unanswered past
its deadline).  The server tells the link of bytes through :meth:`WorkerLink.heard_bytes` (see
:mod:`master_core.metering`), so a healthy worker whose large frame takes seconds on a slow
link is heard all the while.  A step's deadline is ``max(STEP_DEADLINE_FLOOR,
STEP_DEADLINE_FACTOR x`` the step's cost predicted from this link's measurements, its compute
scaled by the stage's recent slowdown, so a busy machine is not a hung one:
:meth:`~master_core.costs.StageCost.slowdown`).  A hung link is *dropped*
(:meth:`WorkerLink.drop`): GONE at once (its waiters fail with :class:`LinkGone`, ``on_gone``
tells the group) while its tunnel stays open, so that frames a frozen worker sends when it
wakes are read, dropped and counted (``on_late``); the tunnel closes ``WAKE_DRAIN``
after the worker speaks again (it then reconnects as a new member) or after ``DROPPED_LINGER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import torch
from aiohttp import WSMsgType, web

from worker_core.inflight import counted, gate
from worker_core.outbox import ROOM_POLL
from worker_core.pieces import Joiner, passes, split
from worker_core.wire import (
    Assign,
    Chunk,
    CloseCode,
    Failure,
    Fetch,
    Fill,
    Free,
    Hello,
    Leave,
    Message,
    ProtocolError,
    Ready,
    Recall,
    Result,
    Route,
    Routed,
    Step,
    encode,
)

from .costs import LinkCost, StageCost
from .liveness import PING_INTERVAL, Liveness
from .weight_source import WeightSource

MAX_FETCHES = 32  # weight chunk requests one worker may have open at once
ABANDONED_KEPT = 1024  # step ids given up on whose late results a link still recognises

# Step deadlines (the third clause of the liveness rule, master_core.liveness).  A stage that hangs
# while its loop lives is rarer than a frozen process and a slow step must not be mistaken for it:
# a CPU shared with other work, a first prefill larger than anything measured, can take several
# times the prediction.  Hence a generous floor and factor.
STEP_DEADLINE_FLOOR = 10.0  # seconds: a step's deadline is never shorter than this
STEP_DEADLINE_FACTOR = 8.0  # ... and otherwise this many times its predicted cost (compute + transfer)
UNMEASURED_STEP_DEADLINE = 30.0  # seconds: a step's deadline before this link's costs are measured
LOOP_LAG_GRACE = 0.5  # seconds a tick may come late: later means the master's own loop stalled; not judged
WAKE_DRAIN = 1.0  # seconds a dropped worker that speaks again is read (late frames counted) before closing
DROPPED_LINGER = 60.0  # seconds a dropped worker that stays silent keeps its tunnel

log = logging.getLogger("molink.link")


class LinkState(Enum):
    CONNECTING = "connecting"
    READY = "ready"
    DRAINING = "draining"
    GONE = "gone"


_MOVES: dict[LinkState, frozenset[LinkState]] = {
    LinkState.CONNECTING: frozenset({LinkState.READY, LinkState.DRAINING, LinkState.GONE}),
    LinkState.READY: frozenset({LinkState.CONNECTING, LinkState.DRAINING, LinkState.GONE}),
    LinkState.DRAINING: frozenset({LinkState.GONE}),
    LinkState.GONE: frozenset(),
}


class LinkGone(Exception):
    """The worker's tunnel closed (or was closed for a protocol error)."""


class StepFailed(Exception):
    """The worker refused or failed one step; the tunnel stays up."""


class Superseded(Exception):
    """An assignment still loading was replaced by a newer one before its ``Ready``, or came while
    a newer one was loading (then it is not sent)."""


class StepLate(StepFailed):
    """A step got no answer in time and was given up on, the stages alive: each holds what it
    held before the step (a stage that computes it late writes the same keys and values, or
    refuses it once a newer generation of its KV ids reached it), so its requests may go on
    from what every stage holds (``Request.computed``) instead of from token 0."""


class StepUnsent(StepLate):
    """The last stage could not feed a step back (``Failure.unsent``: its loop-back hop is
    down, or the step could not loop): like a late step, every stage holds what it held
    before it, so its requests go on from there."""


@dataclass
class _Pending:
    """A step sent and not answered: its caller's future, when it went out, its deadline."""

    future: asyncio.Future
    sent_at: float
    deadline: float  # seconds without any answer from this link after which the step is late
    tokens: int = 0  # rows of the step: work it puts on each stage of its run


def _register(step_id: int, run: tuple[WorkerLink, ...], tokens: int, nbytes: int, sent_at: float) -> _Pending:
    """One pending entry for a step on every stage of its run (any of them may answer it).  Its
    deadline counts the work queued ahead of it on each stage (a decode step behind a long
    prompt's chunk waits for that chunk's compute at every stage)."""
    deadline = sum(link.step_deadline(link.queued_tokens() + tokens, nbytes) for link in run)
    pending = _Pending(asyncio.get_running_loop().create_future(), sent_at, deadline, tokens)
    for link in run:
        link._pending[step_id] = pending
    return pending


def _account(run: tuple[WorkerLink, ...], tokens: int, result: Result) -> None:
    """Each stage's compute for a step, from its result's trail."""
    computes = (*result.trail, result.compute_seconds)
    for link, compute in zip(run, computes):
        link.steps += 1
        link.compute_seconds.append(compute)
        link.stage_cost.observe(tokens, compute)
        link.compute_total += compute


class Expected:
    """A step the master did not send but awaits (fed back by the last stage, ``Step.loop``)."""

    def __init__(self, step_id: int, run: tuple[WorkerLink, ...], tokens: int, pending: _Pending) -> None:
        self.step_id = step_id
        self.run = run
        self.tokens = tokens
        self._pending = pending
        self._settled = False  # its result was taken

    def start(self) -> None:
        """The step exists now (its predecessor's result came): its deadline clock starts."""
        self._pending.sent_at = time.monotonic()

    async def result(self) -> tuple[WorkerLink, Result]:
        """(the link that answered, the result), like :meth:`WorkerLink.call`."""
        try:
            answered, result = await self._pending.future
        except BaseException:
            self.abandon()
            raise
        self._forget()
        self._settled = True
        _account(self.run, self.tokens, result)
        answered.step_bytes_total += result.tensor.numel() * result.tensor.element_size()
        return answered, result

    def fail(self, error: Exception) -> None:
        """Its waiter gets ``error`` now (the pipeline it travels on is gone)."""
        if not self._pending.future.done():
            self._pending.future.set_exception(error)

    def abandon(self) -> None:
        """Not awaited any more: a late result of it is dropped, not a protocol error.  A no-op
        once its result was taken."""
        if self._settled:
            return
        fut = self._pending.future
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()  # retrieved: no "never retrieved" warning for an error nobody awaits
        for link in self.run:
            link._abandoned.append(self.step_id)
        self._forget()

    def _forget(self) -> None:
        for link in self.run:
            link._pending.pop(self.step_id, None)


class WorkerLink:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        hello: Hello,
        peer: str,
        max_frame_bytes: int,
        weights: WeightSource | None = None,
        draft_weights: WeightSource | None = None,
    ) -> None:
        self.ws = ws
        self.hello = hello
        self.peer = peer
        self.name = hello.name
        self.weights = weights  # paired groups: this worker may fetch the weights of its assignment
        self.draft_weights = draft_weights  # ... and of the draft model its assignment names
        self.draft_seconds = 0.0  # what a drafted token costs its draft model, as it last measured (Result)
        self.member: str | None = None  # paired groups: the member this tunnel authenticated as
        self.cert = ""  # paired groups: that member's pinned certificate (PEM), for direct hops
        self._route_waiter: asyncio.Future | None = None
        self._fetches: set[asyncio.Task] = set()  # weight chunks being served
        self._tasks: set[asyncio.Task] = set()  # every task this link started, awaited by wait_closed()
        self.weight_bytes_sent = 0
        self.max_frame_bytes = max_frame_bytes
        self._joiner = Joiner()  # a worker sends longer frames in pieces (worker_core.pieces)
        self.state = LinkState.CONNECTING
        self.on_leave: Callable[[WorkerLink, bool], None] | None = None  # the group's handler of a Leave
        self.on_gone: Callable[[WorkerLink], None] | None = None  # told when the link is dropped as hung
        self.on_late: Callable[[], None] | None = None  # told of each frame read after the link is gone
        self.on_moved: Callable[[WorkerLink, Routed], None] | None = None  # its hop moved path (``Routed.moved``)
        self.assignment: Assign | None = None
        self.ready: Ready | None = None
        self.gone_reason: str | None = None
        self._pending: dict[int, _Pending] = {}
        self._background: dict[int, asyncio.Future[Result]] = {}  # standby steps nobody waits for (background)
        # steps given up on (a stage of their run failed or left) that may still come back from
        # this stage over direct hops: their results are dropped, not a protocol error
        self._abandoned: deque[int] = deque(maxlen=ABANDONED_KEPT)
        self.alive = Liveness(time.monotonic())  # what was heard of the worker, and the rule (master_core.liveness)
        self._dropped = False  # judged hung (``drop``), the tunnel kept open a while: not closed
        self._woke_at: float | None = None  # dropped as hung, then heard from again
        self._ready_waiter: asyncio.Future | None = None
        self._send_lock = asyncio.Lock()  # one frame, or one piece of a longer one, onto the tunnel at a time
        self._in_order = asyncio.Lock()  # every frame but a decode step's or a Free: in order, whole or in pieces
        self._gate = gate(ws)  # pieces wait while the path's queue would grow (worker_core.inflight)
        self._out = counted(lambda data: self.ws.send_bytes(data), self._gate)  # every frame, told to the gate
        self._frees: list[int] = []  # request ids to free before the next step
        self._flush_task: asyncio.Task | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.compute_seconds: deque[float] = deque(maxlen=64)  # per step, as the worker measured
        self.steps = 0
        self.stage_cost = StageCost()  # forward seconds vs tokens, measured
        self.link_cost = LinkCost()  # network seconds vs bytes, measured
        self.compute_total = 0.0  # seconds of forward work done for us
        self.step_bytes_total = 0  # bytes of steps and results carried

    def __repr__(self) -> str:
        return f"WorkerLink({self.name!r}, {self.state.value})"

    def move(self, to: LinkState) -> None:
        """The one place the lifecycle changes; an illegal move is a bug (ValueError)."""
        if to is self.state:
            return
        if to not in _MOVES[self.state]:
            raise ValueError(f"worker {self.name}: cannot go from {self.state.value} to {to.value}")
        self.state = to

    @property
    def pending(self) -> int:
        """Steps sent and not answered yet, plus ``Free`` frames not sent yet (per-request
        entries this link holds: none once every request has ended)."""
        return len(self._pending) + len(self._frees)

    @property
    def placeable(self) -> bool:
        """May a new placement choose this link (connected, not leaving)?"""
        return self.state in (LinkState.CONNECTING, LinkState.READY)

    # ------------------------------------------------------------------ sending
    async def _send(self, msg: Message) -> int:
        """Send ``msg`` (raises ``LinkGone``).  A decode step's frame and a ``Free`` go at once,
        between the pieces of a longer frame on its way (:mod:`worker_core.pieces`: a relayed
        prefill step's hidden states, a weight chunk, a ``Fill``); every other frame waits for
        the one before it, so they keep their order."""
        if self.state is LinkState.GONE:
            raise LinkGone(f"worker {self.name} is gone: {self.gone_reason}")
        frame = encode(msg)
        if passes(msg):
            await self._put(frame)
        else:
            # whole, even where the caller gives up meanwhile: a piece left out would spoil the next frame
            await asyncio.shield(self._spawn(self._put_in_order(frame)))
        self.bytes_sent += len(frame)
        return len(frame)

    async def _put_in_order(self, frame: bytes) -> None:
        async with self._in_order:
            for piece in split(frame):
                while self._gate is not None and not self._gate.room():  # a decode step may go meanwhile
                    await asyncio.sleep(ROOM_POLL)
                await self._put(piece)

    async def _put(self, frame: bytes) -> None:
        if self.state is LinkState.GONE:
            raise LinkGone(f"worker {self.name} is gone: {self.gone_reason}")
        async with self._send_lock:
            try:
                await self._send_frees_locked()
                await self._out(frame)
            except (ConnectionError, RuntimeError) as e:
                self.close_with(f"send failed: {e}")
                raise LinkGone(f"worker {self.name}: {e}") from None

    async def assign(self, assignment: Assign, timeout: float) -> Ready:
        if not self.placeable:
            raise LinkGone(f"worker {self.name} is {self.state.value}: {self.gone_reason or 'leaving'}")
        if self.loading and self.assignment is not None and assignment.epoch < self.assignment.epoch:
            # an older plan never replaces a newer one in flight (a standby's whole-model load made
            # for epoch E, sent after a repair gave the member a stage of epoch E+1)
            raise Superseded(f"epoch {self.assignment.epoch} is being loaded, not {assignment.epoch}")
        self.move(LinkState.CONNECTING)
        self.assignment = assignment
        if self._ready_waiter is not None and not self._ready_waiter.done():  # the worker loads it, then this one
            self._ready_waiter.set_exception(Superseded(f"epoch {assignment.epoch} was assigned meanwhile"))
        self._ready_waiter = asyncio.get_running_loop().create_future()
        await self._send(assignment)
        ready = await asyncio.wait_for(self._ready_waiter, timeout)
        self.ready = ready
        if self.state is LinkState.CONNECTING:  # not if it began to leave meanwhile
            self.move(LinkState.READY)
        return ready

    async def route(self, route: Route, timeout: float) -> Routed:
        """Send a ``Route`` and wait (at most ``timeout``) for the worker's ``Routed``."""
        self._route_waiter = asyncio.get_running_loop().create_future()
        await self._send(route)
        return await asyncio.wait_for(self._route_waiter, timeout)

    @property
    def loading(self) -> bool:
        """An ``Assign`` was sent and its ``Ready`` has not come."""
        return self._ready_waiter is not None and not self._ready_waiter.done()

    def queued_tokens(self) -> int:
        """Tokens of the steps on their way through this stage now (sent, or fed back and
        started): work a new step may wait behind."""
        return sum(p.tokens for p in self._pending.values() if p.sent_at != math.inf)

    def step_deadline(self, tokens: int, nbytes: int) -> float:
        """Seconds a step of ``tokens`` tokens and ``nbytes`` bytes may go unanswered: scaled from
        this link's measured costs (``UNMEASURED_STEP_DEADLINE`` until they are known)."""
        compute, link = self.stage_cost.predict(tokens), self.link_cost.estimate()
        if compute is None or link is None:
            return UNMEASURED_STEP_DEADLINE
        rtt, bandwidth = link
        compute *= self.stage_cost.slowdown()  # a machine busier than when the fit was made is not a hung stage
        return max(STEP_DEADLINE_FLOOR, STEP_DEADLINE_FACTOR * (compute + rtt + nbytes / bandwidth))

    async def call(self, step: Step, onward: tuple[WorkerLink, ...] = ()) -> tuple[WorkerLink, Result]:
        """Send ``step`` to this stage and wait for its ``Result``: (the link that answered, the
        result).  ``onward``: the stages after this one the step may travel to over direct hops
        (``step.forward``); the result comes from whichever of them ends the journey, and a
        ``Failure`` from any of them fails the call.  Each stage's compute is measured from the
        result's trail; the link's network cost only from a step that came straight back."""
        tokens = sum(s.length for s in step.segments)
        nbytes = step.tensor.numel() * step.tensor.element_size()
        run = (self, *onward)
        t0 = time.perf_counter()
        # still travelling when given up on: any stage of its run may yet answer
        sent, answered, result = await self._exchange(step, run, tokens, nbytes, onward and run)
        _account(run, tokens, result)
        back = result.tensor.numel() * result.tensor.element_size()
        if answered is self:
            self.link_cost.observe(sent + back, max(0.0, time.perf_counter() - t0 - result.worker_seconds))
        self.step_bytes_total += sent
        answered.step_bytes_total += back
        return answered, result

    async def background(self, step: Step | Fill, timeout: float) -> Result:
        """Send ``step`` to this standby member and await its ``Result`` (at most ``timeout``
        seconds; raises ``StepFailed``, ``LinkGone`` or ``TimeoutError``).  Work nobody waits for
        (:mod:`master_core.shadow`): neither measured as the member's speed (it serves no stage:
        on a machine shared with stages its pace is theirs to set) nor judged by the liveness
        rule's step deadlines (its pings still are); a late answer is dropped."""
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._background[step.step_id] = fut
        try:
            await self._send(step)
            return await asyncio.wait_for(fut, timeout)
        except BaseException:
            self._abandoned.append(step.step_id)
            raise
        finally:
            self._background.pop(step.step_id, None)

    async def recall(self, recall: Recall) -> torch.Tensor:
        """Send a ``Recall`` and return the rows this stage kept for its segments (bounded like a
        step of as many tokens: a stage that does not answer in time is dropped as hung)."""
        tokens = sum(s.length for s in recall.segments)
        _, _, result = await self._exchange(recall, (self,), tokens, 0, (self,))
        self.step_bytes_total += result.tensor.numel() * result.tensor.element_size()
        return result.tensor

    async def fill(self, fill: Fill) -> None:
        """Send a ``Fill`` and await its answer (bounded like a step of as many tokens on this
        stage, scaled by the layers it fills over those the stage's costs were measured on; not
        measured as its speed)."""
        tokens = sum(s.length for s in fill.segments)
        asg = self.assignment
        if asg is not None:
            filled = fill.layer_end - fill.layer_start
            measured = max(1, asg.layer_end - asg.layer_start - filled)  # its own range before it widened
            tokens = math.ceil(tokens * max(1.0, filled / measured))
        nbytes = fill.tensor.numel() * fill.tensor.element_size()
        await self._exchange(fill, (self,), tokens, nbytes, (self,))
        self.step_bytes_total += nbytes

    async def _exchange(
        self,
        msg: Step | Recall | Fill,
        run: tuple[WorkerLink, ...],
        tokens: int,
        nbytes: int,
        abandon: tuple[WorkerLink, ...],
    ) -> tuple[int, WorkerLink, Result]:
        """Send ``msg`` (registered as pending on every link of ``run``, with the deadline of a
        step of ``tokens`` tokens and ``nbytes`` bytes) and await its ``Result``: (bytes sent,
        the link that answered, the result).  Given up on (cancelled, failed): the links of
        ``abandon`` recognise a late answer to it."""
        pending = _register(msg.step_id, run, tokens, nbytes, time.monotonic())
        try:
            sent = await self._send(msg)
            answered, result = await pending.future
        except BaseException:
            for link in abandon:
                link._abandoned.append(msg.step_id)
            raise
        finally:
            for link in run:
                link._pending.pop(msg.step_id, None)
        return sent, answered, result

    def expect(self, step_id: int, onward: tuple[WorkerLink, ...], tokens: int, nbytes: int) -> Expected:
        """Register step ``step_id``, which the last stage will send into this stage over the
        loop-back hop (``Step.loop``) and which travels on like a step sent with ``onward``: its
        result (or a ``Failure``) is then recognised.  Its deadline runs from ``Expected.start``."""
        run = (self, *onward)
        return Expected(step_id, run, tokens, _register(step_id, run, tokens, nbytes, math.inf))

    def free(self, request_ids: list[int]) -> None:
        """Drop these requests' KV caches on the worker.  The ``Free`` frame goes out before any
        step sent after this call (so the worker's budget is right for it), or within a moment
        when no step follows."""
        if not request_ids or self.state is LinkState.GONE:
            return
        self._frees.extend(request_ids)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = self._spawn(self._flush_frees())

    async def _flush_frees(self) -> None:
        async with self._send_lock:
            await self._send_frees_locked()

    async def _send_frees_locked(self) -> None:
        if not self._frees or self.state is LinkState.GONE:
            return
        ids, self._frees = tuple(self._frees), []
        try:
            await self._out(encode(Free(ids)))
        except (ConnectionError, RuntimeError) as e:
            self.close_with(f"send failed: {e}")

    # ------------------------------------------------------------------ receiving
    def _dispatch(self, msg: object) -> None:
        if self.state is LinkState.GONE:
            if self.on_late is not None:  # closing, or dropped as hung: frames of a pipeline that is gone
                self.on_late()
            return
        if isinstance(msg, Leave):
            log.info("worker %s asks to leave%s", self.name, " once the running requests end" if msg.finish else "")
            if self.on_leave is not None:
                self.on_leave(self, msg.finish)
            else:
                self.close_with("left the group")
        elif isinstance(msg, Result) and (waiting := self._background.get(msg.step_id)) is not None:
            if not waiting.done():
                waiting.set_result(msg)
        elif isinstance(msg, Failure) and (waiting := self._background.get(msg.step_id)) is not None:
            if not waiting.done():
                waiting.set_exception(StepFailed(f"{self.name}: {msg.message}"))
        elif isinstance(msg, Result):
            pending = self._pending.get(msg.step_id)
            if pending is None and msg.step_id not in self._abandoned:
                raise ProtocolError(f"result for unknown step {msg.step_id}")
            # a late one of a step given up on too: computed, so the steps queued behind it start now
            self.alive.answered(time.monotonic())
            if pending is None:
                log.info("worker %s: result of step %d, given up on, dropped", self.name, msg.step_id)
                return
            if not pending.future.done():
                pending.future.set_result((self, msg))
        elif isinstance(msg, Ready):
            waiter = self._ready_waiter
            if self.assignment is not None and msg.epoch < self.assignment.epoch:
                log.info("worker %s: Ready of a superseded assignment (epoch %d) dropped", self.name, msg.epoch)
                return
            if waiter is None or self.assignment is None or msg.epoch != self.assignment.epoch:
                raise ProtocolError(f"unexpected Ready for epoch {msg.epoch}")
            if not waiter.done():
                waiter.set_result(msg)
        elif isinstance(msg, Routed):
            waiter = self._route_waiter
            if waiter is None or self.assignment is None or msg.epoch != self.assignment.epoch:
                raise ProtocolError(f"unexpected Routed for epoch {msg.epoch}")
            if msg.moved:  # its open hop found a better path by itself
                if self.on_moved is not None:
                    self.on_moved(self, msg)
            elif not waiter.done():
                waiter.set_result(msg)
        elif isinstance(msg, Fetch):
            asg = self.assignment
            if asg is not None and any(t.sha256 == msg.sha256 for t in asg.manifest):
                source = self.weights
            elif asg is not None and any(t.sha256 == msg.sha256 for t in asg.draft_manifest):
                source = self.draft_weights
            else:
                source = None
            if source is None:
                raise ProtocolError("Fetch of a tensor outside this worker's assignment")
            if len(self._fetches) >= MAX_FETCHES:
                raise ProtocolError(f"more than {MAX_FETCHES} weight chunks asked for at once")
            task = self._spawn(self._serve_chunk(msg, source))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
        elif isinstance(msg, Failure):
            pending = self._pending.get(msg.step_id)
            fut = pending.future if pending is not None else None
            if fut is not None or msg.step_id in self._abandoned:  # (as a Result's, above)
                self.alive.answered(time.monotonic())
            if fut is not None and not fut.done():
                fut.set_exception((StepUnsent if msg.unsent else StepFailed)(f"{self.name}: {msg.message}"))
            elif msg.step_id < 0 and self._ready_waiter is not None and not self._ready_waiter.done():
                # a load failure names no step; one that does is a late step (e.g. forwarded over a hop
                # before a replay freed its cache), not the assignment failing
                self._ready_waiter.set_exception(StepFailed(f"{self.name}: {msg.message}"))
            elif msg.step_id in self._abandoned:  # e.g. a fed-back step of requests that ended meanwhile
                log.info("worker %s, on a step given up on: %s", self.name, msg.message)
            else:
                log.warning("worker %s reports: %s", self.name, msg.message)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from a worker")

    async def _serve_chunk(self, msg: Fetch, weights: WeightSource) -> None:
        try:
            data, sha = await asyncio.to_thread(weights.read, msg.sha256, msg.offset, msg.length)
        except (ValueError, OSError) as e:
            log.error("worker %s asked for weights we cannot give: %s", self.name, e)
            self.close_with(f"protocol error: {e}", CloseCode.PROTOCOL_ERROR)
            return
        try:
            await self._send(Chunk(msg.sha256, msg.offset, sha, data))
            self.weight_bytes_sent += len(data)
        except LinkGone:
            pass

    async def run_reader(self) -> None:
        """Read frames until the tunnel ends, answering the worker's pings and judging the
        link's liveness meanwhile (the tunnel's WebSocket has autoping and heartbeat off)."""
        watch = self._spawn(self._watch())
        try:
            async for frame in self.ws:
                self._heard(time.monotonic())
                if frame.type is WSMsgType.PING:
                    self._spawn(self._quietly(self.ws.pong(frame.data)))
                    continue
                if frame.type is WSMsgType.PONG:
                    self.alive.pulse(frame.data, time.monotonic())
                    continue
                if frame.type != WSMsgType.BINARY:
                    if frame.type in (WSMsgType.ERROR, WSMsgType.CLOSE, WSMsgType.CLOSING):
                        break
                    raise ProtocolError(f"unexpected {frame.type.name} frame")
                self.bytes_received += len(frame.data)
                if (msg := self._joiner.feed(frame.data, self.max_frame_bytes)) is not None:
                    self._dispatch(msg)
            self.close_with("tunnel closed")
        except ProtocolError as e:
            log.error("worker %s (%s) sent a bad frame, dropping it: %s", self.name, self.peer, e)
            self.close_with(f"protocol error: {e}", CloseCode.PROTOCOL_ERROR)
        except (ConnectionError, asyncio.CancelledError) as e:
            self.close_with(f"connection lost: {type(e).__name__}")
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            watch.cancel()

    def _heard(self, now: float) -> None:
        self.alive.heard(now, alive=not self.loading and self.state is not LinkState.GONE)
        if self._dropped and self._woke_at is None and not self.ws.closed:
            self._woke_at = now
            log.warning("worker %s, dropped as unresponsive, speaks again: its late frames are dropped", self.name)

    def heard_bytes(self) -> None:
        """Bytes of the worker arrived (a frame may still be incomplete): it is not silent."""
        self._heard(time.monotonic())

    def hung(self, now: float) -> str | None:
        """Why this link counts as hung at ``now`` (monotonic), or None: the rule of
        :mod:`master_core.liveness`."""
        return self.alive.hung(now, self.loading, self._pending, self.stage_cost)

    async def _watch(self) -> None:
        """Ping every ``PING_INTERVAL`` and drop the link once :meth:`hung` says so.  A tick that
        comes late by more than ``LOOP_LAG_GRACE`` means this process stalled (frames may be
        waiting unread): nothing is judged on it and the clocks restart."""
        loop = asyncio.get_running_loop()
        ping: asyncio.Task | None = None
        tick = loop.time()
        while self.state is not LinkState.GONE:
            await asyncio.sleep(PING_INTERVAL)
            now, late = time.monotonic(), loop.time() - tick > PING_INTERVAL + LOOP_LAG_GRACE
            tick = loop.time()
            if late:
                self.alive.stalled(now)
                continue
            why = self.hung(now)
            if why is not None:
                self.drop(f"unresponsive: {why}")
                return
            if ping is None or ping.done():
                ping = self._spawn(self._quietly(self.ws.ping()))

    def drop(self, reason: str) -> None:
        """A hung link: GONE now (waiters fail with :class:`LinkGone`; ``on_gone`` tells the
        group, which re-plans), the tunnel kept open a while to count late frames."""
        if self.state is LinkState.GONE:
            return
        log.warning("worker %s dropped: %s", self.name, reason)
        self._dropped = True
        self._end(reason)
        self._spawn(self._linger())
        if self.on_gone is not None:
            self.on_gone(self)

    async def _linger(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + DROPPED_LINGER
        while self._woke_at is None and loop.time() < until and not self.ws.closed:
            await asyncio.sleep(PING_INTERVAL)
        if self._woke_at is not None:
            await asyncio.sleep(WAKE_DRAIN)
        if not self.ws.closed:
            await self._quietly(self.ws.close(code=CloseCode.NORMAL, message=b"dropped as unresponsive; rejoin"))

    @staticmethod
    async def _quietly(coro: Awaitable[object]) -> None:
        """Await a ping, pong or close whose failure only means the tunnel is ending."""
        with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
            await coro

    def close_with(self, reason: str, code: CloseCode = CloseCode.NORMAL) -> None:
        """End this link (GONE): fail everything waiting on it with :class:`LinkGone` and close
        the WebSocket with ``code`` (``PROTOCOL_ERROR`` when the worker broke the protocol).  A
        link dropped as hung, its tunnel still open to count late frames, closes it now."""
        if self.state is not LinkState.GONE:
            self._end(reason)
        if not self.ws.closed:
            self._spawn(self.ws.close(code=code, message=reason.encode()[:120]))

    def _end(self, reason: str) -> None:
        """GONE: everything waiting on this link fails with :class:`LinkGone`."""
        self.move(LinkState.GONE)
        self.gone_reason = reason
        err = LinkGone(f"worker {self.name}: {reason}")
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(err)
        for waiter in (self._ready_waiter, self._route_waiter, *self._background.values()):
            if waiter is not None and not waiter.done():
                waiter.set_exception(err)
        for task in list(self._fetches):
            task.cancel()

    def _spawn(self, coro: Awaitable[object]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_closed(self) -> None:
        """Await every task this link started (its close, pending ``Free`` frames, weight
        chunks being served); call after :meth:`close_with`."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
