"""One tunnel to the master as the worker serves it, and what outlives the tunnels.

Contract
--------
* :class:`Run` is what outlives one tunnel: the events sink, the hop listener (if this worker
  listens) and whether it dials hops, work counters, the live session and a requested leave.
  ``report_stats()`` emits a ``stats`` event every ``STATS_INTERVAL`` seconds until cancelled.
* :class:`Session` is the state of one tunnel.  ``handle(msg, arrived)`` applies one frame from
  the master (or a ``Step`` from the previous stage's hop), in order, and answers on the
  tunnel: ``Assign`` loads the range (delivered weights, the hub, or the model folder; a
  failure is reported as a ``Failure``, not raised) and answers ``Ready`` (the same range with
  the same budgets again keeps the stage and its caches: another stage was replaced).  A range
  that a loaded shard of the same checkpoint and precision holds (a standby's whole model or
  span, or this stage's old, wider range in a re-plan) is carved out of it, its layers shared,
  nothing read; only a whole model's caches (a standby's copy, :mod:`master_core.shadow`) are
  carried into it, a narrowed stage starts with none;
  ``Recall`` answers a ``Result`` with the outputs the stage kept for a rebuild of the next; ``Route`` accepts
  the previous stage and dials the next (bounded) and answers ``Routed``; ``Step`` runs on the
  stage executor (any step but a decode step paused between layers for the decode steps
  waiting, :mod:`worker_core.interleave`) and answers ``Result``, or goes on over the direct hop when marked
  ``forward`` (its ``Result`` to the master when that hop is down); ``Free`` drops caches.
  Outputs leave through outboxes (:mod:`worker_core.outbox`: off the execute loop, which goes on
  computing while they upload): a decode step's (``urgent``, as :mod:`worker_core.inbox` judged
  it on arrival) before any prefill output still queued, on the tunnel and on the direct hop.
  Anything else is a :class:`~worker_core.wire.ProtocolError`.  ``request_chunk``/``on_chunk``
  fetch weight chunks from the master, each bounded by ``CHUNK_TIMEOUT``.
* Dialling, reconnecting and the control channel live in :mod:`worker_core.worker`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import torch

from . import device as devices
from . import model_source
from .config import WorkerConfig
from .control import STATS_INTERVAL, Command, Events, one_line
from .draft_model import MAX_SESSIONS, DraftModel, open_draft_model
from .drafting import LoopDrafts
from .hops import DIRECT_RETRY, MOVE_QUIET, HopListener, HopUnreachable, NextHop
from .hops import dial as dial_next
from .hub_ranges import fetch_from_hub
from .inflight import InFlight, room_of
from .interleave import LayerClock
from .outbox import Outbox
from .pieces import split_item
from .quantize import Precision
from .sampling import candidates, draw, token_generator
from .shaper import LinkShaper
from .shard import Shard, carve, join, load_shard
from .stage import StageRunner, StepRejected
from .weights import WeightCache
from .wire import (
    UNASSIGNED_FRAME_BYTES,
    Assign,
    Chunk,
    Failure,
    Fetch,
    Fill,
    Free,
    Message,
    ProtocolError,
    Ready,
    Recall,
    Result,
    Route,
    Routed,
    Step,
    TensorSpec,
    encode,
    pulse,
    worker_frame_bound,
)

T = TypeVar("T")
log = logging.getLogger("molink.worker")

CHUNK_TIMEOUT = 120.0  # seconds to wait for one weight chunk


class Run:
    """What outlives one tunnel: events, work counters, the live session, the leave."""

    def __init__(self, events: Events, hops: HopListener | None = None, dials: bool = False) -> None:
        self.events = events
        self.hops = hops  # the hop listener (direct hops on and listening), kept across tunnels
        self.dials = dials  # direct hops on: dial the next stage when the master routes one
        self.steps = 0  # steps this process computed
        self.tokens = 0  # rows (tokens) of those steps
        self.session: Session | None = None  # the tunnel that is up (Hello sent), if any
        self.connected = False  # the current dial attempt reached the master
        self.leaving: Command | None = None  # a leave was asked for: never dial again
        # "host:port" where the home router forwards to the hop listener from outside (a mapping
        # it confirmed, public), or "": told to the master in every ``Routed``
        self.mapped = ""

    async def report_stats(self) -> None:
        """A ``stats`` event every STATS_INTERVAL seconds (until cancelled)."""
        loop = asyncio.get_running_loop()
        last_t, last_tokens = loop.time(), self.tokens
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            now = loop.time()
            rate = (self.tokens - last_tokens) / max(now - last_t, 1e-9)
            last_t, last_tokens = now, self.tokens
            runner = self.session.runner if self.session is not None else None
            self.events.emit(
                "stats",
                steps=self.steps,
                tokens=self.tokens,
                tokens_per_s=round(rate, 2),
                kv_requests=len(runner.kv) if runner is not None else 0,
            )


class Session:
    """State of one tunnel connection."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse[bool],
        executor: ThreadPoolExecutor,
        shards: dict,
        device: str,
        uplink: LinkShaper,
        weights: WeightCache,
        run: Run,
        config: WorkerConfig,
        out_gate: InFlight | None = None,
    ) -> None:
        self.run = run
        self.config = config
        self.next_hop: NextHop | None = None  # the direct hop to the next stage, if the master routed one
        self._mover: asyncio.Task | None = None  # a relayed next hop's tries of the direct path
        self.ws = ws
        self.weights = weights
        self._chunks: dict[tuple[str, int], asyncio.Future] = {}
        self.uplink = uplink
        self.executor = executor
        self.shards = shards  # (weights source, start, end, precision) -> Shard, kept across reconnects
        self.device = device
        self.runner: StageRunner | None = None
        self.epoch = -1
        # frames accepted from the master: an Assign or a weight Chunk until a range is served, then
        # also that pipeline's largest step or result (as the master bounds ours: wire.frame_bound)
        self.max_frame = UNASSIGNED_FRAME_BYTES
        self.outbox: Outbox[tuple[bytes, asyncio.Future | None]] = Outbox(self._ship, _in_pieces, room_of(out_gate))
        # runs the decode steps queued meanwhile, between the layers of a longer step (None: none)
        self.between: Callable[[], Awaitable[None]] | None = None
        self.layer_clock = LayerClock()  # measured per served range (reset by Assign)
        self.drafts = LoopDrafts()  # a last stage drafting inside the loop-back (lookup, a draft model)

    async def _ship(self, item: tuple[bytes, asyncio.Future | None]) -> None:
        frame, sent = item
        try:
            await self.uplink.put(frame)
            await self.uplink.drained()  # one frame on the link at a time: what waits keeps its priority
        except BaseException as e:
            if sent is not None and not sent.done():
                sent.set_exception(e if isinstance(e, Exception) else ConnectionError("tunnel closing"))
            raise
        if sent is not None and not sent.done():
            sent.set_result(None)

    def post(self, msg: Message, urgent: bool = False) -> None:
        """Queue ``msg`` for the master and go on (a step's output: see the module docstring)."""
        self.outbox.put((encode(msg), None), urgent)

    async def send(self, msg: Message) -> None:
        """Queue ``msg`` for the master and wait until it has left."""
        sent = asyncio.get_running_loop().create_future()
        self.outbox.put((encode(msg), sent))
        await sent

    async def close(self) -> None:
        """Stop sending: outputs not sent yet are dropped (the tunnel is ending)."""
        self.drafts.close()
        for _, sent in await self.outbox.close():
            if sent is not None and not sent.done():
                sent.set_exception(ConnectionError("the tunnel closed"))

    async def request_chunk(self, sha256: str, offset: int, length: int) -> tuple[bytes, str]:
        """One chunk from the master.  Tensors with equal bytes (e.g. norm weights of ones)
        share a hash: a request already open for the same bytes is awaited, not sent again."""
        key = (sha256, offset)
        fut = self._chunks.get(key)
        owner = fut is None
        if fut is None:
            fut = self._chunks[key] = asyncio.get_running_loop().create_future()
        try:
            if owner:
                await self.send(Fetch(sha256, offset, length))
            chunk: Chunk = await asyncio.wait_for(asyncio.shield(fut), CHUNK_TIMEOUT)
            return chunk.data, chunk.chunk_sha256
        finally:
            if owner:
                self._chunks.pop(key, None)

    def on_chunk(self, chunk: Chunk) -> None:
        fut = self._chunks.get((chunk.sha256, chunk.offset))
        if fut is None or fut.done():
            log.debug("late or unasked weight chunk ignored")
            return
        fut.set_result(chunk)

    async def _resolve(self, model: str, config_json: str, specs: list[TensorSpec], hub: str, what: str) -> Path:
        """A checkpoint folder: the model source named ``model``, or the delivered tensors
        ``specs`` (fetched where missing: from the hub first, then from the master)."""
        if not specs:
            return await asyncio.get_running_loop().run_in_executor(self.executor, model_source.resolve, model)
        if hub:  # spare the master's uplink: read what the hub can give first
            await fetch_from_hub(self.weights, specs, hub)
        missing = self.weights.missing(specs)
        if missing:
            total = sum(s.nbytes for s in missing)
            log.info("fetching %d tensors (%.1f MB) of %s from the master", len(missing), total / 1e6, what)
            t0 = time.perf_counter()
            received = await self.weights.fetch(specs, self.request_chunk)
            dt = time.perf_counter() - t0
            log.info(
                "weights received: %.1f MB in %.2f s (%.1f MB/s)", received / 1e6, dt, received / 1e6 / max(dt, 1e-9)
            )
        return self.weights.folder(model, config_json, specs)

    async def _hold_draft(self, msg: Assign, vocab_size: int) -> float:
        """Hold the Assign's draft model (none: drop it); the seconds one drafted token costs
        (0: none held)."""
        if not msg.draft_model:
            self.drafts.drop()
            return 0.0
        specs = list(msg.draft_manifest)

        async def load() -> DraftModel:
            folder = await self._resolve(msg.draft_model, msg.draft_config_json, specs, "", "the draft model")
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, open_draft_model, folder, vocab_size, MAX_SESSIONS
            )

        key = frozenset(s.sha256 for s in specs) if specs else msg.draft_model
        return await self.drafts.hold(key, load)

    async def handle(self, msg: object, arrived: float, urgent: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(msg, Assign):
            await self.close_hop()  # a new pipeline: the master routes it once it is loaded
            t0 = time.perf_counter()
            precision = Precision(msg.quantize)  # checked by wire.decode
            # (the next stage's layers loaded too, or the first stage's: copies)
            span_start, span_end = 0 if msg.copy_first else msg.layer_start, msg.copy_end or msg.layer_end
            key = (_source(msg), span_start, span_end, precision)
            runner, fields = self.runner, (msg.layer_start, msg.layer_end, msg.copy_end, msg.copy_first)
            if runner is not None and self._loaded_here(key):  # a copy taken over or dropped: caches kept
                served = (runner.shard.layer_start, runner.shard.layer_end)
                if await loop.run_in_executor(self.executor, runner.reshape, *fields):  # (after any fill)
                    self.shards.clear()
                    self.shards[key] = runner.loaded
                    if served != (msg.layer_start, msg.layer_end):
                        lack = len(runner.unfilled)
                        log.info("took over the layers kept as a copy; %d request(s) lack some positions", lack)
            shard = self.shards.get(key)
            carried = None  # a standby's copy of the open requests' caches (master_core.shadow), or ours
            missing = None  # layers a widened range adds, which the carried caches lack
            if shard is None and (held := self._holding(key)) is not None:  # a whole model, a span, our old range
                shard = carve(held, span_start, span_end)
                whole = held.is_first and held.is_last
                if whole and self.runner is not None and self.runner.shard is held:  # a standby's copy
                    carried = self.runner.kv.narrowed(msg.layer_start, msg.layer_end, msg.kv_tokens)
                self.shards.clear()  # the layers it does not serve are freed
                self.shards[key] = shard
                log.info(
                    "took layers [%d, %d) from the [%d, %d) kept loaded",
                    msg.layer_start,
                    msg.layer_end,
                    held.layer_start,
                    held.layer_end,
                )
            own = self.runner.shard if self.runner is not None else None
            if shard is None and own is not None and self._loaded_here(key):
                missing = _added(own.layer_start, own.layer_end, msg)
            if shard is None:
                if missing is None:
                    self.runner = None
                    self.shards.clear()  # one shard at a time: free the old range first
                start, end = missing or (span_start, span_end)
                try:
                    info = devices.pick(self.device)
                    specs = list(msg.manifest)
                    what = f"layers [{start}, {end})"
                    folder = await self._resolve(msg.model, msg.config_json, specs, msg.hub, what)
                    if specs:  # the draft model's tensors are kept too
                        keep = specs + list(msg.draft_manifest)
                        await loop.run_in_executor(self.executor, self.weights.prune, keep)
                    shard = await loop.run_in_executor(
                        self.executor, load_shard, folder, start, end, info.device, info.dtype, precision
                    )
                    if missing is not None and own is not None and self.runner is not None:  # joined to ours
                        await loop.run_in_executor(
                            self.executor, self.runner.reshape, own.layer_start, own.layer_end, 0, False
                        )
                        shard = join(own, shard)
                        carried = self.runner.kv
                        self.shards.clear()
                        log.info(
                            "took over layers [%d, %d) beside ours; kept the caches of %d request(s)",
                            start,
                            end,
                            len(carried),
                        )
                except Exception as e:  # tell the master why, instead of leaving it waiting
                    log.exception("cannot load layers [%d, %d)", msg.layer_start, msg.layer_end)
                    why = f"cannot load layers [{msg.layer_start}, {msg.layer_end}): {type(e).__name__}: {e}"
                    self.run.events.emit("error", message=one_line(why))
                    await self.send(Failure(why[:4000]))
                    return
                self.shards[key] = shard
            kept = self.runner
            serve_end = msg.layer_end if msg.copy_end else None
            if carried is not None:
                self.runner = StageRunner(
                    shard, msg.kv_tokens, msg.max_batch_tokens, msg.tapes, carried, missing, serve_end
                )
                if missing is None:
                    log.info("kept the caches of %d request(s) computed while standing by", len(carried))
            elif (
                kept is not None
                and kept.loaded is shard
                and kept.max_batch_tokens == msg.max_batch_tokens
                and kept.serves(*fields)
            ):  # the same stage again (another stage was replaced), or a copy taken over: caches stay
                kept.kv.budget_tokens = msg.kv_tokens
                kept.keep_tapes(msg.tapes)
            else:
                serve_start = msg.layer_start if msg.copy_first else 0
                self.runner = StageRunner(
                    shard, msg.kv_tokens, msg.max_batch_tokens, msg.tapes, serve_end=serve_end, serve_start=serve_start
                )
            draft_seconds = await self._hold_draft(msg, shard.vocab_size)
            self.layer_clock = LayerClock()
            self.epoch = msg.epoch
            self.max_frame = worker_frame_bound(msg.max_batch_tokens, shard.hidden_size, shard.vocab_size)
            if self.run.hops is not None:  # steps over a hop are bounded like the master's
                self.run.hops.max_frame = self.max_frame
            await self.send(
                Ready(
                    msg.epoch,
                    shard.hidden_size,
                    shard.vocab_size,
                    time.perf_counter() - t0,
                    shard.weight_bytes,
                    draft_seconds,
                )
            )
            copy = f", keeping a copy of the next stage's [{msg.layer_end}, {msg.copy_end})" if msg.copy_end else ""
            copy += f", keeping a copy of the first stage's [0, {msg.layer_start})" if msg.copy_first else ""
            log.info(
                "serving layers [%d, %d) of %d (epoch %d)%s",
                msg.layer_start,
                msg.layer_end,
                msg.num_layers,
                msg.epoch,
                copy,
            )
            layers = [msg.layer_start, msg.layer_end]
            self.run.events.emit("serving", layers=layers, num_layers=msg.num_layers, epoch=msg.epoch)
        elif isinstance(msg, Route):
            await self.send(await self._route(msg))
        elif isinstance(msg, Step):
            if (runner := await self._serving(msg, "step")) is None:
                return
            if msg.drop:  # the stage frees them before it runs (StageRunner): so do the drafts
                self.drafts.free(msg.drop)
            if (done := await self._attempt(msg, self._compute(runner, msg, urgent))) is None:
                return
            out, compute = done
            self.run.steps += 1
            self.run.tokens += sum(seg.length for seg in msg.segments)
            held = time.perf_counter() - arrived
            result = Result(msg.step_id, msg.epoch, compute, held, out, msg.trail, held=msg.held)
            hop = self.next_hop
            if runner.shard.is_last:
                if msg.loop:
                    drawn, drafts, by_model = await self._loop_back(msg, out)
                    cost = self.drafts.token_seconds if by_model else 0.0
                    result = replace(result, tokens=drawn, drafts=drafts, by_model=by_model, draft_seconds=cost)
                self.post(result, urgent)
            elif msg.forward and hop is not None and hop.epoch == msg.epoch:
                onward = replace(msg, tensor=out, forward=True, trail=(*msg.trail, compute), held=(*msg.held, held))

                async def relayed() -> None:  # the hop went down: the master takes it on
                    self.post(result, urgent)

                await hop.send(onward, relayed, urgent)
            else:
                self.post(result, urgent)
        elif isinstance(msg, Recall):
            if (runner := await self._serving(msg, "recall")) is None:
                return
            rows = await self._attempt(msg, loop.run_in_executor(self.executor, runner.recall, msg.segments))
            if rows is not None:
                self.post(Result(msg.step_id, msg.epoch, 0.0, time.perf_counter() - arrived, rows), urgent)
        elif isinstance(msg, Fill):
            if (runner := await self._serving(msg, "fill")) is None:
                return
            # a rebuild's fill runs while every stage waits for it; a copy's, in the background
            waited = not runner.copying(msg.layer_start, msg.layer_end) and runner.shard.device.type == "cpu"
            fill = every_core(runner.fill) if waited else runner.fill
            work = loop.run_in_executor(self.executor, fill, msg.segments, msg.tensor, msg.layer_start, msg.layer_end)
            seconds = await self._attempt(msg, work)
            if seconds is None:
                return
            empty = torch.empty(0, runner.shard.hidden_size)
            self.post(Result(msg.step_id, msg.epoch, seconds, time.perf_counter() - arrived, empty))
        elif isinstance(msg, Free):
            if self.runner is not None:
                self.runner.free(msg.request_ids)
            self.drafts.free(msg.request_ids)
        elif isinstance(msg, Failure):
            log.warning("master reports: %s", msg.message)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from the master")

    async def _serving(self, msg: Step | Recall | Fill, what: str) -> StageRunner | None:
        """The stage that serves ``msg``'s epoch, or None once the master is told it is not served."""
        if self.runner is None or msg.epoch != self.epoch:
            why = f"{what} of epoch {msg.epoch} but this worker serves epoch {self.epoch}"
            await self.send(Failure(why, msg.step_id))
            return None
        return self.runner

    async def _attempt(self, msg: Step | Recall | Fill, work: Awaitable[T]) -> T | None:
        """``work``'s result, or None once the master is told why it failed: refused by the
        stage, or a compute failure (e.g. out of memory; the worker keeps serving)."""
        try:
            return await work
        except StepRejected as e:
            await self.send(Failure(str(e), msg.step_id))
        except Exception as e:
            log.exception("%s %d failed", type(msg).__name__.lower(), msg.step_id)
            await self.send(Failure(f"{type(e).__name__}: {e}", msg.step_id))
        return None

    def _loaded_here(self, key: tuple) -> bool:
        """Whether this stage's runner serves a shard loaded from ``key``'s checkpoint and precision."""
        runner = self.runner
        return runner is not None and any(
            (have, p) == (key[0], key[3]) and shard is runner.loaded for (have, _, _, p), shard in self.shards.items()
        )

    def _holding(self, key: tuple) -> Shard | None:
        """A loaded shard of the same checkpoint and precision that holds every layer of the range
        of ``key`` (a standby's whole model or span, or this stage's old, wider range), or None."""
        source, start, end, precision = key
        for (have, _, _, p), shard in self.shards.items():
            same = have >= source if isinstance(have, frozenset) and isinstance(source, frozenset) else have == source
            if same and p is precision and shard.layer_start <= start and end <= shard.layer_end:
                return shard
        return None

    def pulse(self) -> bytes:
        """The payload of a pong to the master: the stage's compute progress (wire.pulse)."""
        runner = self.runner
        return b"" if runner is None else pulse(runner.progress, runner.computing)

    async def _compute(self, runner: StageRunner, msg: Step, urgent: bool) -> tuple[torch.Tensor, float]:
        """Run ``msg`` on the stage executor and return its output and compute seconds.  A decode
        step (``urgent``) runs whole; any other step runs a few layers at a time
        (:class:`~worker_core.stage.StepRun`), and the decode steps that arrive meanwhile run
        between them (``between``), so they wait for a few layers of a prefill chunk, not for
        all of it: without that they would follow the chunk from stage to stage."""
        loop = asyncio.get_running_loop()
        if urgent or self.between is None:
            out = await loop.run_in_executor(self.executor, runner.run, msg.segments, msg.tensor, msg.topk, msg.drop)
            return out, runner.last_compute_seconds
        tokens, total = sum(seg.length for seg in msg.segments), len(runner.shard.layers)
        step = await loop.run_in_executor(self.executor, runner.begin, msg.segments, msg.tensor, msg.topk, msg.drop)
        try:
            layers = self.layer_clock.layers(tokens, total)
            while not await loop.run_in_executor(self.executor, step.advance, layers):
                await self.between()
        finally:
            step.close()  # abandoned when cancelled or failed: nothing committed
        assert step.result is not None
        self.layer_clock.observe(tokens, total, step.seconds)
        return step.result, step.seconds

    async def _loop_back(
        self, msg: Step, rows: torch.Tensor
    ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[bool, ...]]:
        """The last stage draws each segment's tokens and feeds the next ones straight back to
        the first stage as the next step (``Step.loop``): one token per row (drawn for the
        position it goes to), accepted while they match the drafts the segment carried
        (``Draw.drafts``); the last accepted (or the first that differs) continues the segment,
        with up to ``Draw.k`` drafts of prompt lookup after it, or where lookup finds nothing up
        to ``Draw.model_k`` of the draft model (:class:`~worker_core.drafting.LoopDrafts`; halved
        for the rest of the loop after a step whose drafts were all rejected).
        Returns (every row's token, each segment's drafts in the next step, whether the draft
        model made them) for its ``Result``; empty when it cannot loop back (the master, which
        expects that step, is told at once)."""
        nxt = msg.step_id + 1
        hop = self.next_hop

        async def refuse(why: str) -> None:
            await self.send(Failure(f"step {nxt} cannot loop back: {why}", nxt, unsent=True))

        if not all(seg.want_logits for seg in msg.segments) or len(msg.draws) != len(msg.segments):
            await refuse("a segment wants no logits, or has no draw")
            return (), (), ()
        if hop is None or hop.epoch != msg.epoch:
            await refuse("no loop-back hop to the first stage")
            return (), (), ()
        more = msg.loop - 1  # steps the last stage feeds back after the next one
        histories = self.drafts.histories
        drawn: list[int] = []
        taken_by, jobs = [], []
        row = 0
        for seg, d in zip(msg.segments, msg.draws):
            first = seg.start + seg.length - seg.rows  # the position of the segment's first row's input
            if d.history:
                histories.start(seg.request_id, d.history)
            tokens = []
            for j in range(seg.rows):
                values, ids, _ = candidates(rows[row + j], msg.topk)
                tokens.append(draw(values, ids, d.temperature, d.top_p, token_generator(d.seed, first + j + 1)))
            row += seg.rows
            drawn += tokens
            taken = 1  # the first row's token, then one more per draft it matched
            while taken <= len(d.drafts) and tokens[taken - 1] == d.drafts[taken - 1]:
                taken += 1
            histories.extend(seg.request_id, tokens[:taken])
            # the draft model's budget halves for the rest of the loop after drafts all rejected
            # (the master chooses it again for the next loop, from every step's acceptance)
            model_k = d.model_k // 2 if d.drafts and taken == 1 else d.model_k
            taken_by.append((first + taken, tokens[taken - 1], d.left - taken, model_k))
            cap = d.left - taken - 1 - more  # the next step's drafts leave a token for every step after it
            jobs.append((seg.request_id, min(d.k, cap), min(model_k, cap)))
        made = await self.drafts.draft(jobs)  # nothing to draft: no model call, nothing awaited
        if not more:  # the next step is the master's to draw: nothing more to draft here
            histories.forget([seg.request_id for seg in msg.segments])
        segments, inputs, draws = [], [], []
        for seg, d, (start, token, left, model_k), (ahead, _) in zip(msg.segments, msg.draws, taken_by, made):
            segments.append(
                replace(seg, start=start, length=1 + len(ahead), want_logits=True, base=0, rows=1 + len(ahead))
            )
            inputs += [token, *ahead]
            draws.append(replace(d, left=left, history=(), drafts=ahead, model_k=model_k))
        x = torch.tensor(inputs, dtype=torch.int64)
        step = Step(
            nxt, msg.epoch, tuple(segments), x, msg.topk, forward=True, loop=more, draws=tuple(draws) if more else ()
        )
        now = self.next_hop
        if now is not None and now.epoch == msg.epoch:
            hop = now  # it may have moved off the relay while this drafted
        await hop.send(step, lambda: refuse("the loop-back hop is down"), urgent=True)  # a decode step
        drafts = tuple(ahead for ahead, _ in made)
        by_model = tuple(m for _, m in made)
        return tuple(drawn), drafts if any(drafts) else (), by_model if any(by_model) else ()

    async def _route(self, msg: Route) -> Routed:
        """Apply a ``Route``: who may dial in, and the hop to the next stage (dialled now,
        bounded); the answer says whether that hop is direct."""
        hops, mapped = self.run.hops, self.run.mapped
        await self.close_hop()
        if hops is not None:
            hops.accept(msg.epoch, msg.accept_token, msg.accept_cert)
        if not self.run.dials:
            return Routed(msg.epoch, False, reason="direct hops are off on this worker", mapped=mapped)
        if not (msg.next_address or msg.next_relay):
            return Routed(msg.epoch, False, reason="no next hop", mapped=mapped)
        try:
            hop, seconds = await self._dial(msg, msg.next_relay)
        except HopUnreachable as e:
            log.info("next stage not reachable directly, relaying through the master: %s", e)
            return Routed(msg.epoch, False, reason=str(e)[:500], mapped=mapped)
        self.next_hop = hop
        where = f"through relay {hop.through}" if hop.through else f"at {msg.next_address}"
        log.info("direct hop to the next stage %s (%.1f ms)", where, seconds * 1000)
        if hop.through and msg.next_address:
            self._mover = asyncio.create_task(self._move_direct(msg, hop))
        return Routed(msg.epoch, True, seconds * 1000, mapped=mapped, through=hop.through)

    async def _dial(self, msg: Route, relay: str) -> tuple[NextHop, float]:
        cfg = self.config
        rate = cfg.link_mbps * 1e6 / 8 if cfg.link_mbps else None
        identity = cfg.identity if cfg.tls is not None else None
        delay = cfg.link_delay_ms / 1000.0
        return await dial_next(msg.next_address, msg.epoch, msg.next_token, msg.next_cert, identity, delay, rate, relay)

    async def _move_direct(self, msg: Route, relayed: NextHop) -> None:
        """While the hop to the next stage crosses the relay, try the next stage's direct
        address every ``DIRECT_RETRY`` s (a port mapping or a firewall rule may come later).
        Once it opens and the relayed hop has been quiet ``MOVE_QUIET`` s (a hop's steps must
        arrive in order), the direct hop takes over, the relayed one closes, and the master is
        told (``Routed.moved``).  A direct hop that opens while the relayed one stays busy for
        ``DIRECT_RETRY`` s is closed and tried again later.  Ends when the hop is replaced,
        goes down or the session closes it (cancelled)."""
        while self.next_hop is relayed and relayed.down is None:
            await asyncio.sleep(DIRECT_RETRY)
            try:
                direct, seconds = await self._dial(msg, "")
            except HopUnreachable as e:
                log.debug("the next stage is still not reachable directly: %s", e)
                continue
            try:
                waited = 0.0
                while self.next_hop is relayed and relayed.down is None and relayed.quiet_for() < MOVE_QUIET:
                    if waited >= DIRECT_RETRY:
                        break
                    await asyncio.sleep(0.25)
                    waited += 0.25
            except asyncio.CancelledError:
                await direct.close()
                raise
            if self.next_hop is not relayed or relayed.down is not None or relayed.quiet_for() < MOVE_QUIET:
                await direct.close()
                continue
            self.next_hop = direct  # nothing awaited since the check: no step went out in between
            await relayed.close()
            log.info("the hop to the next stage moved off relay %s to %s", relayed.through, msg.next_address)
            await self.send(Routed(msg.epoch, True, seconds * 1000, mapped=self.run.mapped, moved=True))
            return

    async def close_hop(self) -> None:
        mover, self._mover = self._mover, None
        if mover is not None and mover is not asyncio.current_task():
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)
        hop, self.next_hop = self.next_hop, None
        if hop is not None:
            await hop.close()


def _in_pieces(item: tuple[bytes, asyncio.Future | None]) -> list[tuple[bytes, asyncio.Future | None]]:
    """A frame for the master in pieces (:mod:`worker_core.pieces`); its sender is told once the last left."""
    return split_item(item, None)


def every_core(work: Callable[..., T]) -> Callable[..., T]:
    """``work`` run with torch's threads on every core of this machine, then as many as before:
    a fill runs while every stage of the pipeline waits for it (a worker that shares the
    machine with others is otherwise given fewer threads, ``WorkerConfig.threads``)."""

    def run(*args: Any) -> T:
        before = torch.get_num_threads()
        torch.set_num_threads(max(before, os.cpu_count() or 1))
        try:
            return work(*args)
        finally:
            torch.set_num_threads(before)

    return run


def _added(start: int, end: int, msg: Assign) -> tuple[int, int] | None:
    """The layers ``msg`` adds to a stage's range ``[start, end)`` on one side (a stage taking over
    its lost neighbour's layers, which a repair asks with no copies), or None when it is not such
    a widening."""
    if msg.copy_end or msg.copy_first:
        return None
    new_start, new_end = msg.layer_start, msg.layer_end
    if new_start == start and new_end > end:
        return end, new_end
    if new_end == end and new_start < start:
        return new_start, start
    return None


def _source(msg: Assign) -> frozenset[str] | str:
    """What an assignment's weights are, whatever its range: the tensors delivered (their
    hashes; a range of the same checkpoint names a subset of the whole's) or the model ref."""
    return frozenset(spec.sha256 for spec in msg.manifest) if msg.manifest else msg.model
