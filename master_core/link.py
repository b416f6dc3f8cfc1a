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
sends an ``Assign`` and waits for the matching ``Ready``; ``call`` sends a ``Step`` and waits
for its ``Result``.  ``run_reader`` reads frames until the tunnel ends: a malformed frame or
an unexpected message is a :class:`~worker_core.wire.ProtocolError`, which closes this link
(with a log line) and fails everything waiting on it with :class:`LinkGone`; nothing else in
the process is affected.  ``close_with(reason, code)`` ends a link; the WebSocket close code
is chosen by the caller from what happened (:class:`~worker_core.wire.CloseCode`), never from
the reason's text.  Every task a link starts is kept and awaited by ``wait_closed()``.  A
``Failure`` naming a step fails that step's caller with :class:`StepFailed`.  Measured per
link: compute seconds of the last steps, the round trip beyond compute, and bytes each way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import Enum

from aiohttp import WSMsgType, web

from worker_core.wire import (
    Assign,
    Chunk,
    CloseCode,
    Failure,
    Fetch,
    Free,
    Hello,
    Leave,
    Message,
    ProtocolError,
    Ready,
    Result,
    Step,
    decode,
    encode,
)

from .costs import LinkCost, StageCost
from .weight_source import WeightSource

MAX_FETCHES = 32  # weight chunk requests one worker may have open at once

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


class WorkerLink:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        hello: Hello,
        peer: str,
        max_frame_bytes: int,
        weights: WeightSource | None = None,
    ) -> None:
        self.ws = ws
        self.hello = hello
        self.peer = peer
        self.name = hello.name
        self.weights = weights  # paired groups: this worker may fetch the weights of its assignment
        self.member: str | None = None  # paired groups: the member this tunnel authenticated as
        self._fetches: set[asyncio.Task] = set()  # weight chunks being served
        self._tasks: set[asyncio.Task] = set()  # every task this link started, awaited by wait_closed()
        self.weight_bytes_sent = 0
        self.max_frame_bytes = max_frame_bytes
        self.state = LinkState.CONNECTING
        self.on_leave: Callable[[WorkerLink, bool], None] | None = None  # the group's handler of a Leave
        self.assignment: Assign | None = None
        self.ready: Ready | None = None
        self.gone_reason: str | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ready_waiter: asyncio.Future | None = None
        self._send_lock = asyncio.Lock()
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
        if self.state is LinkState.GONE:
            raise LinkGone(f"worker {self.name} is gone: {self.gone_reason}")
        frame = encode(msg)
        async with self._send_lock:
            try:
                await self._send_frees_locked()
                await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError) as e:
                self.close_with(f"send failed: {e}")
                raise LinkGone(f"worker {self.name}: {e}") from None
        self.bytes_sent += len(frame)
        return len(frame)

    async def assign(self, assignment: Assign, timeout: float) -> Ready:
        if not self.placeable:
            raise LinkGone(f"worker {self.name} is {self.state.value}: {self.gone_reason or 'leaving'}")
        self.move(LinkState.CONNECTING)
        self.assignment = assignment
        self._ready_waiter = asyncio.get_running_loop().create_future()
        await self._send(assignment)
        ready = await asyncio.wait_for(self._ready_waiter, timeout)
        self.ready = ready
        if self.state is LinkState.CONNECTING:  # not if it began to leave meanwhile
            self.move(LinkState.READY)
        return ready

    async def call(self, step: Step) -> Result:
        fut = asyncio.get_running_loop().create_future()
        self._pending[step.step_id] = fut
        t0 = time.perf_counter()
        try:
            sent = await self._send(step)
            result: Result = await fut
        finally:
            self._pending.pop(step.step_id, None)
        network = max(0.0, time.perf_counter() - t0 - result.worker_seconds)
        moved = sent + result.tensor.numel() * result.tensor.element_size()
        self.steps += 1
        self.compute_seconds.append(result.compute_seconds)
        self.stage_cost.observe(sum(s.length for s in step.segments), result.compute_seconds)
        self.link_cost.observe(moved, network)
        self.compute_total += result.compute_seconds
        self.step_bytes_total += moved
        return result

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
            await self.ws.send_bytes(encode(Free(ids)))
        except (ConnectionError, RuntimeError) as e:
            self.close_with(f"send failed: {e}")

    # ------------------------------------------------------------------ receiving
    def _dispatch(self, msg: object) -> None:
        if self.state is LinkState.GONE:
            return  # closing: frames still in flight (a late Result) concern nobody
        if isinstance(msg, Leave):
            log.info("worker %s asks to leave%s", self.name, " once the running requests end" if msg.finish else "")
            if self.on_leave is not None:
                self.on_leave(self, msg.finish)
            else:
                self.close_with("left the group")
        elif isinstance(msg, Result):
            fut = self._pending.get(msg.step_id)
            if fut is None:
                raise ProtocolError(f"result for unknown step {msg.step_id}")
            if not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Ready):
            waiter = self._ready_waiter
            if waiter is None or self.assignment is None or msg.epoch != self.assignment.epoch:
                raise ProtocolError(f"unexpected Ready for epoch {msg.epoch}")
            if not waiter.done():
                waiter.set_result(msg)
        elif isinstance(msg, Fetch):
            if (
                self.weights is None
                or self.assignment is None
                or not any(t.sha256 == msg.sha256 for t in self.assignment.manifest)
            ):
                raise ProtocolError("Fetch of a tensor outside this worker's assignment")
            if len(self._fetches) >= MAX_FETCHES:
                raise ProtocolError(f"more than {MAX_FETCHES} weight chunks asked for at once")
            task = self._spawn(self._serve_chunk(msg))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
        elif isinstance(msg, Failure):
            fut = self._pending.get(msg.step_id)
            if fut is not None and not fut.done():
                fut.set_exception(StepFailed(f"{self.name}: {msg.message}"))
            elif self._ready_waiter is not None and not self._ready_waiter.done():
                self._ready_waiter.set_exception(StepFailed(f"{self.name}: {msg.message}"))
            else:
                log.warning("worker %s reports: %s", self.name, msg.message)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from a worker")

    async def _serve_chunk(self, msg: Fetch) -> None:
        weights = self.weights
        if weights is None:  # checked by _dispatch
            return
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
        try:
            async for frame in self.ws:
                if frame.type != WSMsgType.BINARY:
                    if frame.type in (WSMsgType.ERROR, WSMsgType.CLOSE, WSMsgType.CLOSING):
                        break
                    raise ProtocolError(f"unexpected {frame.type.name} frame")
                self.bytes_received += len(frame.data)
                self._dispatch(decode(frame.data, self.max_frame_bytes))
            self.close_with("tunnel closed")
        except ProtocolError as e:
            log.error("worker %s (%s) sent a bad frame, dropping it: %s", self.name, self.peer, e)
            self.close_with(f"protocol error: {e}", CloseCode.PROTOCOL_ERROR)
        except (ConnectionError, asyncio.CancelledError) as e:
            self.close_with(f"connection lost: {type(e).__name__}")
            if isinstance(e, asyncio.CancelledError):
                raise

    def close_with(self, reason: str, code: CloseCode = CloseCode.NORMAL) -> None:
        """End this link (GONE): fail everything waiting on it with :class:`LinkGone` and close
        the WebSocket with ``code`` (``PROTOCOL_ERROR`` when the worker broke the protocol)."""
        if self.state is LinkState.GONE:
            return
        self.move(LinkState.GONE)
        self.gone_reason = reason
        if not self.ws.closed:
            self._spawn(self.ws.close(code=code, message=reason.encode()[:120]))
        err = LinkGone(f"worker {self.name}: {reason}")
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(err)
        if self._ready_waiter is not None and not self._ready_waiter.done():
            self._ready_waiter.set_exception(err)
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
