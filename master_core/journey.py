"""One micro-batch step's way through the pipeline, as the master drives it.

Contract
--------
``Relay(group, topk)`` numbers the steps of one engine (from 1, ``step_ids``) and takes them through the
group's current pipeline.  ``await relay.send(stages, epoch, chunks, tokens, direct, loop,
draws)`` sends the chunks' token ids to the first stage and returns a :class:`Journey` with the
last stage's rows (top-``topk`` packed when ``topk`` > 0): each run of stages joined by direct
hops (``direct``) takes the step on without the master (``Step.forward``), every other hop is
relayed here, and a run that ends early (its hop went down) continues relayed.  With ``loop``
the last stage feeds that many further steps straight back to the first stage (``Step.loop``),
drawing their tokens by ``draws``; they come back registered in the journey, and ``await
relay.looped(stages, epoch, chunks, expected)`` awaits the journey of each in turn.  A step
forwarded over direct hops or fed back that gets no answer within the longest deadline of its
stages is taken for lost on a hop that died quietly: those hops (and the loop-back) are relayed
from now on and the step fails, before any stage's own deadline could drop a worker that did
nothing wrong.  Raises :class:`~master_core.link.LinkGone` (the pipeline was replaced, a link is
gone), :class:`~master_core.link.StepFailed` (:class:`~master_core.link.StepLate` when it was
given up on for want of an answer: the stages live on and keep their caches), or
``ProtocolError`` (a worker answered with the wrong shape; its link is closed).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any

import torch

from worker_core.wire import CloseCode, Draw, ProtocolError, Result, Segment, Step, logits_row_width

from .group import Group
from .link import Expected, LinkGone, StepFailed, StepLate, WorkerLink
from .scheduler import Chunk


@dataclass(frozen=True)
class Journey:
    """A step's way through the pipeline: the last stage's rows, the tokens it drew and fed back
    (one per row; none when the master draws), the steps it loops back next (registered, not yet
    awaited) and the runs it took (1: it went through without the master).  For timelines:
    each stage's compute seconds in order, and the seconds it waited in the queue of the stage
    that ended each run (its ``worker_seconds`` beyond its compute); ``held``: the seconds each
    stage held it, from its arrival to handing it on (empty when a stage did not say)."""

    logits: torch.Tensor
    tokens: tuple[int, ...]
    looped: list[Expected]
    legs: int
    computes: tuple[float, ...] = ()
    queued: float = 0.0
    drafts: tuple[tuple[int, ...], ...] = ()  # per chunk, the drafts the last stage sent on with the next step
    by_model: tuple[bool, ...] = ()  # per chunk: those drafts are the last stage's draft model's (empty: none)
    draft_seconds: float = 0.0  # with by_model: what a drafted token costs that model now, as the stage measured
    held: tuple[float, ...] = ()


class Relay:
    def __init__(self, group: Group, topk: int) -> None:
        self.group = group
        self.topk = topk
        self.step_ids = itertools.count(1)

    async def send(
        self,
        stages: list[WorkerLink],
        epoch: int,
        chunks: list[Chunk],
        tokens: dict[int, list[int]],
        direct: bool = True,
        loop: int = 0,
        draws: tuple[Draw, ...] = (),
        arrived: Coroutine[Any, Any, tuple[WorkerLink, Result]] | None = None,
        topk: int | None = None,
        marks: dict[int, tuple[int, int]] | None = None,
        drop: tuple[int, ...] = (),
    ) -> Journey:
        """One micro-batch through the pipeline: the token ids to the first stage, the last
        stage's logits back.  In between, each run of stages joined by direct hops takes the
        step from its first stage to its last without the master (``Step.forward``); every other
        hop is relayed here.  A run that ends early (its hop went down) continues relayed.
        ``loop``: the step asks the last stage to feed back that many steps on its own (drawing
        their tokens by ``draws``, one per chunk), when it travels there in one run; they are
        returned in the :class:`Journey`, registered and not yet awaited.  ``arrived``: the
        first run is a step already travelling (fed back), awaited here.  ``topk``: of the
        last stage's rows for this step (None: the relay's; 0: whole rows).  ``marks``: KV id ->
        (generation, cached prefix it starts from, or 0) of its segment (``wire.Segment``);
        ``drop``: KV ids every stage frees before the step runs (``Step.drop``)."""
        topk = self.topk if topk is None else topk
        marks = marks or {}
        segments = tuple(
            Segment(c.request_id, c.start, c.length, c.want_logits, *marks.get(c.request_id, (0, 0)), rows=c.rows)
            for c in chunks
        )
        ids: list[int] = []
        for c in chunks:
            ids.extend(tokens[c.request_id])
        x = torch.tensor(ids, dtype=torch.int64)  # [T]
        total = sum(c.length for c in chunks)
        dims = self.group.dims
        row = logits_row_width(topk, dims.vocab_size)
        hops = self.group.hops if direct else []
        looped: list[Expected] = []
        drawn: tuple[int, ...] = ()
        drafts: tuple[tuple[int, ...], ...] = ()
        by_model: tuple[bool, ...] = ()
        draft_seconds = 0.0
        computes: list[float] = []
        held: list[float] = []
        queued = 0.0
        i = legs = 0
        try:
            while i < len(stages):
                if self.group.epoch != epoch:  # replaced meanwhile: its caches are freed, make no new ones
                    raise LinkGone(f"the pipeline of epoch {epoch} was replaced")
                end = i
                while end < len(hops) and hops[end].direct:
                    end += 1
                if arrived is not None:
                    link, result = await arrived
                    arrived = None
                else:
                    whole = i == 0 and end == len(stages) - 1
                    step = Step(next(self.step_ids), epoch, segments, x, topk, end > i, drop=drop)
                    if loop and whole:
                        step = replace(step, loop=loop, draws=draws)
                        looped = self._expect_looped(stages, step)
                    link, result = await self._call(stages, epoch, step, i, end)
                legs += 1
                computes += [*result.trail, result.compute_seconds]
                held += [*result.held, result.worker_seconds]
                queued += max(0.0, result.worker_seconds - result.compute_seconds)
                at = stages.index(link)
                if at < end:
                    self.group.hop_lost(epoch, at, f"{link.name} could not send on directly")
                    for exp in looped:  # the step never reached the last stage: nothing loops back
                        exp.abandon()
                    looped = []
                x = result.tensor  # hidden [T, hidden] or logits [n, row]
                last = at == len(stages) - 1
                expect = (sum(c.logit_rows for c in chunks), row) if last else (total, dims.hidden_size)
                drawn, drafts, by_model = result.tokens, result.drafts, result.by_model
                draft_seconds = result.draft_seconds
                if drawn and (not last or len(drawn) != expect[0] or max(drawn) >= dims.vocab_size):
                    why = f"named {len(drawn)} drawn tokens for {expect[0]} rows"
                    link.close_with(f"protocol error: {why}", CloseCode.PROTOCOL_ERROR)
                    raise ProtocolError(f"worker {link.name} {why}")
                if drafts and (
                    not drawn or len(drafts) != len(chunks) or max(max(d, default=0) for d in drafts) >= dims.vocab_size
                ):
                    why = f"named drafts for {len(drafts)} of {len(chunks)} segments"
                    link.close_with(f"protocol error: {why}", CloseCode.PROTOCOL_ERROR)
                    raise ProtocolError(f"worker {link.name} {why}")
                if by_model and (not drafts or len(by_model) != len(chunks)):
                    why = f"named the draft model's drafts for {len(by_model)} of {len(chunks)} segments"
                    link.close_with(f"protocol error: {why}", CloseCode.PROTOCOL_ERROR)
                    raise ProtocolError(f"worker {link.name} {why}")
                if tuple(x.shape) != expect or not x.is_floating_point():
                    why = f"returned a tensor of shape {list(x.shape)} {x.dtype}, expected {list(expect)}"
                    link.close_with(f"protocol error: {why}", CloseCode.PROTOCOL_ERROR)
                    raise ProtocolError(f"worker {link.name} {why}")
                i = at + 1
        except BaseException:
            for exp in looped:
                exp.abandon()
            raise
        told = len(held) == len(computes)  # every stage said how long it held the step
        went = Journey(x, drawn, looped, legs, tuple(computes), queued, drafts, by_model, draft_seconds)
        return replace(went, held=tuple(held)) if told else went

    def _expect_looped(self, stages: list[WorkerLink], step: Step) -> list[Expected]:
        """Register the ``step.loop`` steps the last stage will feed back after ``step`` (their
        ids follow its id: taken from the counter here, before anything else can take one)."""
        rows = len(step.segments)
        looped = []
        for _ in range(step.loop):
            step_id = next(self.step_ids)
            looped.append(stages[0].expect(step_id, tuple(stages[1:]), rows, 8 * rows))
        return looped

    async def looped(
        self,
        stages: list[WorkerLink],
        epoch: int,
        chunks: list[Chunk],
        exp: Expected,
        marks: dict[int, tuple[int, int]] | None = None,
    ) -> Journey:
        """The journey of a step the last stage fed back: awaited from the first stage on, like
        a step sent over every direct hop (relayed on from wherever it stopped).  No answer
        within the longest deadline of a stage: taken for lost on a hop that died quietly (every
        hop and the loop-back are relayed from now on)."""
        exp.start()
        limit = max(link.step_deadline(link.queued_tokens(), 8 * exp.tokens) for link in stages)  # it is queued

        async def arrival() -> tuple[WorkerLink, Result]:
            try:
                return await asyncio.wait_for(exp.result(), limit)
            except asyncio.TimeoutError:
                self.group.loop_back_lost(epoch, f"a step fed back over it got no answer in {limit:.0f} s")
                for hop in range(len(stages) - 1):
                    self.group.hop_lost(epoch, hop, f"a looped step got no answer in {limit:.0f} s")
                raise StepLate(f"looped step {exp.step_id} got no answer in {limit:.0f} s") from None

        arrived = arrival()
        try:  # no token ids: the first run was sent by the last stage
            empty: dict[int, list[int]] = {c.request_id: [] for c in chunks}
            return await self.send(stages, epoch, chunks, empty, arrived=arrived, marks=marks)
        except StepFailed as e:  # refused (its hop is down) or failed on its way: the master drives again
            self.group.loop_back_lost(epoch, str(e))
            raise
        finally:
            arrived.close()  # not awaited when the pipeline was replaced first; else a no-op
            exp.abandon()  # a no-op once its result came

    async def _call(
        self, stages: list[WorkerLink], epoch: int, step: Step, first: int, last: int
    ) -> tuple[WorkerLink, Result]:
        """Send ``step`` to stage ``first``; over direct hops it may travel on to stage ``last``.
        A step forwarded over direct hops that gets no answer within the longest deadline of one
        of its stages is taken for lost on a hop that died quietly: those hops are relayed from
        now on and the step fails (its requests replay on the same pipeline), before any
        stage's own deadline could drop a worker that did nothing wrong."""
        onward = tuple(stages[first + 1 : last + 1])
        call = stages[first].call(step, onward)
        if not onward:
            return await call
        tokens = sum(seg.length for seg in step.segments)
        nbytes = step.tensor.numel() * step.tensor.element_size()
        # it may wait behind every step already on its way through a stage (a burst of long prompts)
        limit = max(link.step_deadline(link.queued_tokens() + tokens, nbytes) for link in stages[first : last + 1])
        try:
            return await asyncio.wait_for(call, limit)
        except asyncio.TimeoutError:
            for hop in range(first, last):
                self.group.hop_lost(epoch, hop, f"a step sent over it got no answer in {limit:.0f} s")
            raise StepLate(f"step {step.step_id} got no answer over direct hops in {limit:.0f} s") from None
