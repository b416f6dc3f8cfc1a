"""A discrete-event simulator of the pipeline, driven by the real scheduler code.

Contract
--------
``simulate(model, workload, policy)`` replays a workload (:mod:`master_core.workload`)
against a modelled pipeline and returns the same metrics the real benchmark reports.  The
decisions — admission and preemption, micro-batches in flight, which requests and how many
prefill tokens go in each micro-batch — are made by :mod:`master_core.scheduler`, exactly as
the engine makes them.  Only the physics is modelled:

* stage i computes a step of n tokens in ``fixed_i + per_token_i * n`` seconds, one step at a
  time (FIFO), on a slot of its device (``CostSnapshot.devices``: stages of one device share
  its slots, e.g. several workers on one machine's cores);
* the link between the master and stage i carries each direction FIFO at ``bandwidth_i``
  bytes/s, and adds ``rtt_i / 2`` one-way delay;
* a micro-batch leaves the master over link 0's down direction and its logits come back over
  the last link's up direction; each hop between stages i and i+1 is either relayed (up link i
  to the master, then down link i+1: two crossings) or direct (``CostSnapshot.direct[i]``): stage i
  sends straight to stage i+1 on its own up link (the same FIFO at ``bandwidth_i``: a machine's
  uplink carries everything it sends) with one ``rtt_i / 2`` delay (every two machines are half
  a round trip apart), touching neither the master nor stage i+1's link; ``direct=()`` means
  every hop relayed (the scheduler plans with the same snapshot, so it knows which hops are direct);
* the master adds ``master_seconds`` once per step, when the logits are back (sampling,
  bookkeeping), whatever the hops; relaying a hop costs it no modelled time;
* where the pipeline loops back (``CostSnapshot.loop_back``), a micro-batch whose every row
  wants logits at the end of its request goes on for :func:`~master_core.scheduler.loop_steps`
  more steps on its own, as the engine's: the last stage sends each step's drawn tokens to the
  master and the next step straight to the first stage (both on its own up link, half its
  round trip away); the master is not crossed between them, and each fed-back step books the
  stages and links it uses when it reaches the first stage.  A looping lane needs no slot
  (:func:`~master_core.scheduler.lanes_open`, the engine's rule).

Decisions are the scheduler's, with the same inputs as the engine's: the micro-batches
carrying prefill in flight (``prefilling``), the lanes looping.  Not modelled: a stage pausing
a prefill step between its layers for the decode steps that arrive (every stage here runs
its steps whole, in the order they were booked), the micro-batch tuner (the cost model's K
is used as it is), and preemption by KV pressure mid-loop.

Because every resource is FIFO and micro-batches enter in the order they are planned, a
micro-batch's whole journey can be booked when it is planned.  Sampling is not modelled:
every request generates exactly its ``output_tokens``.  No clock, no I/O, no torch.  The bytes
figure counts every link crossing (a relayed hop twice, a direct one once).  Besides
the benchmark figures the result has ``steps`` and ``peak_kv_tokens`` (the most KV tokens the
running requests held or had in flight at once: what every stage's cache had to hold).

``cards_to_hold(dims, card_bytes, precision)`` is the other half of a modelled group: how many
equal cards of ``card_bytes`` the planner needs to place a model (its layers at ``precision``,
embeddings, head and the KV reserve at the compute dtype; :meth:`ModelDims.shape`), None when
more than ``most`` would be needed.  ``LLAMA3_70B`` and friends are real models' dimensions
for it (parameter counts from their published configurations).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import cast

from worker_core.precision import Precision

from .costs import CostSnapshot
from .model_dims import ModelDims
from .placement import Member, PlacementError, kv_token_budget, plan_pipeline
from .scheduler import (
    TOKEN_ID_BYTES,
    Candidate,
    Chunk,
    KVView,
    Policy,
    admit_and_preempt,
    lanes_open,
    loop_steps,
    microbatch_count,
    next_microbatch,
    step_bytes,
)
from .workload import BenchRequest, summarize


@dataclass(frozen=True)
class SimModel:
    costs: CostSnapshot  # per stage: compute line, link RTT and bandwidth; activation sizes
    kv_tokens: int  # KV budget of the smallest stage, tokens
    master_seconds: float = 0.002  # master work per step
    max_running: int = 64


class _Event(Enum):
    ARRIVE = "a request arrives"
    FED = "a step fed back by the last stage reaches the first"
    DONE = "a step's result is back at the master"


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
        # per device, when each of its slots is free next (stages of one device share them)
        self.device_of = [0] * c.stages
        self.slot_free: list[list[float]] = []
        for d, (stages, slots) in enumerate(c.device_groups()):
            for i in stages:
                self.device_of[i] = d
            self.slot_free.append([0.0] * slots)
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

    def journey(self, t: float, tokens: int, logits_rows: int, feeds_back: bool = False) -> tuple[float, float]:
        """Book one micro-batch leaving the master at ``t``; return when its result is back at
        the master, and (``feeds_back``) when the step its last stage feeds back reaches the
        first stage (else ``inf``)."""
        c = self.m.costs
        arrive = self._send(self.down_free, self.busy_down, 0, t, step_bytes(c, 0, tokens, logits_rows)[0])
        return self.fed(arrive, tokens, logits_rows, feeds_back)

    def fed(self, arrive: float, tokens: int, logits_rows: int, feeds_back: bool) -> tuple[float, float]:
        """Book one step reaching the first stage at ``arrive`` through the pipeline, as
        :meth:`journey` (booked when it arrives, so steps fed back queue among the others by
        their arrival)."""
        c = self.m.costs
        last = c.stages - 1
        done = self._through(arrive, tokens, logits_rows)
        nxt = math.inf
        if feeds_back:  # the drawn tokens go straight back to the first stage, before the result
            nxt = self._send(self.up_free, self.busy_up, last, done, tokens * TOKEN_ID_BYTES)
        back = self._send(self.up_free, self.busy_up, last, done, step_bytes(c, last, tokens, logits_rows)[1])
        return back + self.m.master_seconds, nxt

    def _through(self, arrive: float, tokens: int, logits_rows: int) -> float:
        """Book one step arriving at the first stage at ``arrive`` through every stage (and
        the hops between them); return when the last stage has computed it."""
        c = self.m.costs
        t = arrive
        for i in range(c.stages):
            dur = c.stage_fixed[i] + c.stage_per_token[i] * tokens
            start = max(arrive, self.stage_free[i])
            slots = self.slot_free[self.device_of[i]]  # the device's earliest free slot
            k = min(range(len(slots)), key=slots.__getitem__)
            start = max(start, slots[k])
            slots[k] = start + dur
            self.stage_free[i] = start + dur
            self.busy_compute[i] += dur
            t = start + dur
            if i + 1 < c.stages:
                # stage i's up link carries its output: to the master, or straight to stage i + 1 on a direct hop
                t = self._send(self.up_free, self.busy_up, i, t, step_bytes(c, i, tokens, logits_rows)[1])
                relayed_in = step_bytes(c, i + 1, tokens, logits_rows)[0]
                arrive = t if c.direct_into(i + 1) else self._send(self.down_free, self.busy_down, i + 1, t, relayed_in)
        return t


def simulate(model: SimModel, workload: list[BenchRequest], policy: Policy) -> dict:
    run = _Run(model, workload, policy)
    run.until_done()
    return _metrics(run)


class _Run:
    """One simulation: the event queue (arrivals, micro-batch returns) and the requests' states.
    Decisions are the scheduler's (``admit_and_preempt``, ``microbatch_count``, ``next_microbatch``)."""

    def __init__(self, model: SimModel, workload: list[BenchRequest], policy: Policy) -> None:
        self.model = model
        self.policy = policy
        self.reqs = [_Req(spec=w, index=i, tokens=w.prompt_tokens) for i, w in enumerate(workload)]
        self.waiting: list[_Req] = []
        self.running: dict[int, _Req] = {}
        self.pipe = _Pipeline(model)
        self.events: list[tuple[float, int, _Event, object]] = []
        self.seq = 0
        stages = model.costs.stages
        self.lane_busy = [False] * (
            policy.max_microbatches if policy.dynamic else max(1, policy.fixed_microbatches or stages)
        )
        self.admitted = 0
        self.prefilling = 0  # lanes whose micro-batch carries prefill
        self.looping = 0  # lanes whose micro-batch loops back
        self.steps = 0
        self.peak_kv_tokens = 0  # most KV tokens the running requests held (or had in flight) at once
        for r in self.reqs:
            self._push(r.spec.arrival, _Event.ARRIVE, r)

    def _push(self, t: float, kind: _Event, payload: object) -> None:
        heapq.heappush(self.events, (t, self.seq, kind, payload))
        self.seq += 1

    def until_done(self) -> None:
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind is _Event.ARRIVE:
                self.waiting.append(cast(_Req, payload))
            elif kind is _Event.FED:  # a step its last stage fed back reaches the first stage: book its trip
                lane, plan, k, loop = cast(tuple[int, list[Chunk], int, int], payload)
                self._book(now, lane, plan, k, loop)
                continue  # nothing new for the scheduler
            else:
                lane, plan, k, loop = cast(tuple[int, list[Chunk], int, int], payload)
                self._complete(now, plan, k)
                if k == loop:  # the lane's last step: it is free again
                    self.lane_busy[lane] = False
                    self.prefilling -= any(ch.length > 1 for ch in plan)
                    self.looping -= bool(loop)
                    for ch in plan:
                        if ch.request_id in self.running:
                            self.running[ch.request_id].in_flight -= 1
            self._try_lanes(now)
        if self.running or self.waiting:
            raise RuntimeError(
                f"simulation ended with {len(self.running)} running and {len(self.waiting)} waiting requests"
            )

    def _admit(self) -> None:
        views = [KVView(r.index, r.tokens, r.order, r.in_flight > 0) for r in self.running.values()]
        waiting = [(r.index, r.tokens) for r in self.waiting]
        admit, preempt = admit_and_preempt(views, waiting, self.model.kv_tokens, self.model.max_running)
        for idx in preempt:
            r = self.running.pop(idx)
            r.computed = r.scheduled = 0
            self.waiting.insert(0, r)
        for idx in admit:
            r = next(x for x in self.waiting if x.index == idx)
            self.waiting.remove(r)
            r.order = self.admitted
            self.admitted += 1
            self.running[idx] = r

    def _try_lanes(self, t: float) -> None:
        self._admit()
        c = self.model.costs
        slots = microbatch_count(self.policy, c, c.stages, len(self.running))
        for lane in range(len(self.lane_busy)):
            if self.lane_busy[lane] or (lane >= lanes_open(slots, self.looping) and lane > 0):
                continue
            cands = [
                Candidate(r.index, r.scheduled, r.tokens, r.order, r.in_flight, r.computed)
                for r in self.running.values()
            ]
            plan = next_microbatch(self.policy, c, cands, slots, prefilling=self.prefilling)
            if not plan:
                return
            reqs = [self.running[ch.request_id] for ch in plan]
            ends = all(ch.want_logits and ch.start + ch.length == r.tokens for ch, r in zip(plan, reqs))
            left = [r.spec.output_tokens - r.generated for r in reqs]
            loop = loop_steps(self.policy, self.looping, left) if c.loop_back and ends else 0
            for ch, r in zip(plan, reqs):
                r.scheduled = ch.start + ch.length + loop
                r.in_flight += 1
            self.peak_kv_tokens = max(self.peak_kv_tokens, sum(r.scheduled for r in self.running.values()))
            self.lane_busy[lane] = True
            self.prefilling += any(ch.length > 1 for ch in plan)
            self.looping += bool(loop)
            self._book(t, lane, plan, 0, loop)

    def _book(self, t: float, lane: int, plan: list[Chunk], k: int, loop: int) -> None:
        """Book the ``k``-th step of a micro-batch: sent by the master at ``t`` (k = 0), or fed
        back by its last stage and reaching the first stage at ``t``."""
        tokens, rows = sum(ch.length for ch in plan), sum(ch.want_logits for ch in plan)
        if k == 0:
            back, nxt = self.pipe.journey(t, tokens, rows, loop > 0)
        else:
            tokens = rows = len(plan)  # a fed-back step: one token of each request
            back, nxt = self.pipe.fed(t, tokens, rows, k < loop)
        self.steps += 1
        self._push(back, _Event.DONE, (lane, plan, k, loop))
        if k < loop:
            self._push(nxt, _Event.FED, (lane, plan, k + 1, loop))

    def _complete(self, t: float, plan: list[Chunk], k: int) -> None:
        """Fold in the ``k``-th step of a micro-batch (0: the one the master sent; then the
        steps its last stage fed back, one token further each)."""
        for ch in plan:
            r = self.running.get(ch.request_id)
            if r is None:
                continue
            end = ch.start + ch.length + k
            if r.scheduled < end:
                continue  # preempted meanwhile
            r.computed = max(r.computed, end)
            if ch.want_logits and r.computed == r.tokens:
                r.tokens += 1
                r.token_times.append(t)
                if r.generated >= r.spec.output_tokens:
                    r.done_at = t
                    del self.running[r.index]


def _metrics(run: _Run) -> dict:
    pipe, model = run.pipe, run.model
    devices = [
        max(max(pipe.busy_compute[i] for i in stages), sum(pipe.busy_compute[i] for i in stages) / slots)
        for stages, slots in model.costs.device_groups()
    ]
    busy = devices + pipe.busy_down + pipe.busy_up
    extra = {"steps": run.steps, "peak_kv_tokens": run.peak_kv_tokens}
    return summarize([r.spec.arrival for r in run.reqs], [r.token_times for r in run.reqs], pipe.bytes, busy, extra)


# --------------------------------------------------------------------------- which cards hold a model


def _llama_like(layers: int, hidden: int, inter: int, kv_heads: int, vocab: int, experts: int = 1) -> ModelDims:
    """A Llama-family decoder (grouped-query attention, head_dim 128, gated MLP; ``experts``
    MLPs per layer for a mixture of experts) as the master would parse it."""
    head_dim = 128
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    mlp = experts * 3 * hidden * inter + (hidden * experts if experts > 1 else 0)  # + the router
    embed = vocab * hidden
    return ModelDims(
        num_layers=layers,
        hidden_size=hidden,
        vocab_size=vocab,
        max_positions=8192,
        kv_bytes_per_token=2 * kv_heads * head_dim * 4,
        layer_params=(attn + mlp + 2 * hidden,) * layers,
        embed_params=embed,
        head_params=embed + hidden,  # an untied head and the final norm
        layer_kept_params=(hidden * kv_heads * head_dim + experts * hidden * inter,) * layers,  # v and down
    )


LLAMA3_8B = _llama_like(32, 4096, 14336, 8, 128_256)
MIXTRAL_8X7B = _llama_like(32, 4096, 14336, 8, 32_000, experts=8)
LLAMA3_70B = _llama_like(80, 8192, 28672, 8, 128_256)
REFERENCE_MODELS = {"Llama-3-8B": LLAMA3_8B, "Mixtral-8x7B": MIXTRAL_8X7B, "Llama-3-70B": LLAMA3_70B}


def cards_to_hold(
    dims: ModelDims, card_bytes: int, precision: Precision, itemsize: int = 2, most: int = 16
) -> int | None:
    """Fewest equal cards offering ``card_bytes`` each that hold the model (None: more than ``most``)."""
    shape = dims.shape(precision, itemsize)
    for n in range(1, most + 1):
        try:
            plan_pipeline(shape, [Member(str(i), card_bytes, 1.0) for i in range(n)])
        except PlacementError:
            continue
        return n
    return None


def kv_tokens_on_cards(
    dims: ModelDims, cards: int, card_bytes: int, precision: Precision, itemsize: int = 2, cap: int = 65536
) -> int:
    """KV budget (tokens) of the smallest stage when ``cards`` equal cards of ``card_bytes`` hold
    the model at ``precision`` as the planner places it (what :class:`SimModel` ``kv_tokens``
    is for a modelled group); raises :class:`PlacementError` when they cannot hold it."""
    plan = plan_pipeline(dims.shape(precision, itemsize), [Member(str(i), card_bytes, 1.0) for i in range(cards)])
    return min(
        kv_token_budget(
            card_bytes, dims.stage_bytes(a, b, precision, itemsize), dims.token_bytes(a, b, itemsize, False), cap
        )
        for a, b in plan.ranges
    )
