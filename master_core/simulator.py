"""A discrete-event simulator of the pipeline, driven by the real scheduler code.

Contract
--------
``simulate(model, workload, policy)`` replays a workload (:mod:`master_core.workload`)
against a modelled pipeline and returns the same metrics the real benchmark reports.  The
decisions — admission and preemption, micro-batches in flight, which requests and how many
prefill tokens go in each micro-batch — are made by :mod:`master_core.scheduler`, exactly as
the engine makes them.  Only the physics is modelled:

* stage i computes a step of n tokens in ``fixed_i + per_token_i * n`` seconds, one step at a
  time (FIFO);
* the link between the master and stage i carries each direction FIFO at ``bandwidth_i``
  bytes/s, and adds ``rtt_i / 2`` one-way delay;
* a micro-batch travels master -> stage 0 -> master -> stage 1 ... -> master (the relay);
  the master adds ``master_seconds`` per step (sampling, bookkeeping).

Because every resource is FIFO and micro-batches enter in the order they are planned, a
micro-batch's whole journey can be booked when it is planned.  Sampling is not modelled:
every request generates exactly its ``output_tokens``.  No clock, no I/O, no torch.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from .costs import CostSnapshot
from .scheduler import Candidate, Chunk, KVView, Policy, admit_and_preempt, chunk_tokens, microbatch_count, microbatch_share, plan_microbatch
from .workload import BenchRequest, summarize


@dataclass(frozen=True)
class SimModel:
    costs: CostSnapshot  # per stage: compute line, link RTT and bandwidth; activation sizes
    kv_tokens: int  # KV budget of the smallest stage, tokens
    master_seconds: float = 0.002  # master work per step
    max_running: int = 64
    cores: int | None = None  # CPU cores shared by all stages (None: every stage has its own device)


@dataclass
class _Req:
    spec: BenchRequest
    index: int
    tokens: int  # prompt + generated so far
    computed: int = 0
    scheduled: int = 0
    in_flight: int = 0
    order: int = -1
    token_times: list[float] = field(default_factory=list)
    done_at: float | None = None

    @property
    def generated(self) -> int:
        return self.tokens - self.spec.prompt_tokens


class _Pipeline:
    """Resource bookings of stages and links (times in seconds)."""

    def __init__(self, m: SimModel) -> None:
        self.m = m
        c = m.costs
        self.stage_free = [0.0] * c.stages
        self.down_free = [0.0] * c.stages
        self.up_free = [0.0] * c.stages
        self.cpu_free = [0.0] * (m.cores or 0)
        self.busy_compute = [0.0] * c.stages
        self.busy_down = [0.0] * c.stages  # each direction is its own FIFO resource
        self.busy_up = [0.0] * c.stages
        self.bytes = 0

    def _send(self, free: list[float], busy: list[float], i: int, t: float, nbytes: int) -> float:
        c = self.m.costs
        bw = c.link_bandwidth[i]
        dur = nbytes / bw if math.isfinite(bw) and bw > 0 else 0.0
        start = max(t, free[i])
        free[i] = start + dur
        busy[i] += dur
        self.bytes += nbytes
        return start + dur + c.link_rtt[i] / 2

    def journey(self, t: float, tokens: int, logits_rows: int) -> float:
        """Book one micro-batch leaving the master at ``t``; return when its result is back."""
        c = self.m.costs
        for i in range(c.stages):
            inbound = tokens * (8 if i == 0 else c.hidden_bytes_per_token)
            outbound = logits_rows * c.logits_bytes_per_row if i == c.stages - 1 else tokens * c.hidden_bytes_per_token
            arrive = self._send(self.down_free, self.busy_down, i, t, inbound)
            dur = c.stage_fixed[i] + c.stage_per_token[i] * tokens
            start = max(arrive, self.stage_free[i])
            if self.cpu_free:  # stages share a few CPU cores: take the earliest free one
                k = min(range(len(self.cpu_free)), key=lambda j: self.cpu_free[j])
                start = max(start, self.cpu_free[k])
                self.cpu_free[k] = start + dur
            self.stage_free[i] = start + dur
            self.busy_compute[i] += dur
            t = self._send(self.up_free, self.busy_up, i, start + dur, outbound)
        return t + self.m.master_seconds


def simulate(model: SimModel, workload: list[BenchRequest], policy: Policy) -> dict:
    c = model.costs
    reqs = [_Req(spec=w, index=i, tokens=w.prompt_tokens) for i, w in enumerate(workload)]
    waiting: list[_Req] = []
    running: dict[int, _Req] = {}
    pipe = _Pipeline(model)
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    for r in reqs:
        push(r.spec.arrival, "arrive", r)
    max_lanes = policy.max_microbatches if policy.dynamic else max(1, policy.fixed_microbatches or c.stages)
    lane_busy = [False] * max_lanes
    admitted = 0
    steps = 0
    now = 0.0

    def admit() -> None:
        nonlocal admitted
        views = [KVView(r.index, r.tokens, r.order, r.in_flight > 0) for r in running.values()]
        adm, pre = admit_and_preempt(views, [(r.index, r.tokens) for r in waiting], model.kv_tokens, model.max_running)
        for idx in pre:
            r = running.pop(idx)
            r.computed = r.scheduled = 0
            waiting.insert(0, r)
        for idx in adm:
            r = next(x for x in waiting if x.index == idx)
            waiting.remove(r)
            r.order = admitted
            admitted += 1
            running[idx] = r

    def try_lanes(t: float) -> None:
        nonlocal steps
        admit()
        slots = microbatch_count(policy, c, c.stages, len(running))
        for lane in range(min(slots, max_lanes)):
            if lane_busy[lane]:
                continue
            cands = [Candidate(r.index, r.scheduled, r.tokens, r.order, r.in_flight) for r in running.values()]
            share = microbatch_share(len(running), slots)
            ready = sum(1 for x in cands if x.total - x.scheduled == 1 and x.in_flight == 0)
            decodes = min(share, ready)
            plan = plan_microbatch(cands, max_decodes=decodes, prefill_tokens=chunk_tokens(policy, c, decodes, slots), min_chunk=policy.min_chunk)
            if not plan:
                return
            for ch in plan:
                r = running[ch.request_id]
                r.scheduled = ch.start + ch.length
                r.in_flight += 1
            back = pipe.journey(t, sum(ch.length for ch in plan), sum(ch.want_logits for ch in plan))
            lane_busy[lane] = True
            steps += 1
            push(back, "done", (lane, plan))

    def complete(t: float, plan: list[Chunk]) -> None:
        for ch in plan:
            r = running.get(ch.request_id)
            if r is None:
                continue
            r.in_flight -= 1
            if r.scheduled < ch.start + ch.length:
                continue  # preempted meanwhile
            r.computed = max(r.computed, ch.start + ch.length)
            if ch.want_logits and r.computed == r.tokens:
                r.tokens += 1
                r.token_times.append(t)
                if r.generated >= r.spec.output_tokens:
                    r.done_at = t
                    del running[r.index]

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            waiting.append(payload)  # type: ignore[arg-type]
        else:
            lane, plan = payload  # type: ignore[misc]
            lane_busy[lane] = False
            complete(now, plan)
        try_lanes(now)
    if running or waiting:
        raise RuntimeError(f"simulation ended with {len(running)} running and {len(waiting)} waiting requests")
    return _metrics(reqs, pipe, model, steps)


def _metrics(reqs: list[_Req], pipe: _Pipeline, model: SimModel, steps: int) -> dict:
    busy = pipe.busy_compute + pipe.busy_down + pipe.busy_up
    if model.cores:
        busy.append(sum(pipe.busy_compute) / model.cores)
    return summarize([r.spec.arrival for r in reqs], [r.token_times for r in reqs], pipe.bytes, busy, {"steps": steps})
