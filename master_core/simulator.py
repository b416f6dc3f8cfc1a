"""A discrete-event simulator of the pipeline, driven by the real scheduler code.

Contract
--------
``simulate(model, workload, policy)`` replays a workload (:mod:`master_core.workload`)
against a modelled pipeline and returns the same metrics the real benchmark reports.  The
decisions — admission and preemption, micro-batches in flight (the cost model's count, tuned
online by :class:`~master_core.tuner.MicrobatchTuner` from what the steps deliver, as the
engine's), which requests and how many prefill tokens go in each micro-batch, how many steps a
micro-batch loops back — are made by :mod:`master_core.scheduler`, exactly as the engine makes
them, with the same inputs: the micro-batches carrying prefill in flight (``prefilling``), the
lanes looping, and the costs (``SimModel.costs``, or as they moved during a real run:
``SimModel.plan_costs``).  The physics is event-driven (:mod:`master_core.sim_pipeline`): each stage a
server with the worker's inbox (decode steps first, a waiting step first after its patience)
that pauses a longer step between its layers for the decode steps queued
(``SimModel.stage_layers``), on a device whose cores its stages share; each link direction one
frame at a time, a stage's own sends decode-first; a hop direct or relayed through the master
(``CostSnapshot.direct``); the loop-back (``CostSnapshot.loop_back``): a micro-batch whose
every row wants logits at the end of its request runs :func:`~master_core.scheduler.loop_steps`
more steps on its own, each fed by the last stage straight to the first (a looping lane needs
no slot, :func:`~master_core.scheduler.lanes_open`).  A step's compute is read from the cost
line the scheduler plans with, or from the stages' measured curves (``SimModel.stage_curves``:
the real engine plans with the line while its stages compute at the curve's cost).  The master
adds ``master_seconds`` once per step, when the logits are back.

Not modelled: preemption by KV pressure mid-loop, sampling (every request generates exactly its
``output_tokens``), speculation.  No wall clock, no I/O, no torch.  The bytes figure counts
every link crossing (a relayed hop twice, a direct one once).  Besides the benchmark figures
the result has ``steps`` and ``peak_kv_tokens`` (the most KV tokens the running requests held
or had in flight at once: what every stage's cache had to hold).

``cards_to_hold(dims, card_bytes, precision)`` is the other half of a modelled group: how many
equal cards of ``card_bytes`` the planner needs to place a model (its layers at ``precision``,
embeddings, head and the KV reserve at the compute dtype; :meth:`ModelDims.shape`), None when
more than ``most`` would be needed.  ``LLAMA3_70B`` and friends are real models' dimensions
for it (parameter counts from their published configurations).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import cast

from worker_core.precision import Precision

from .costs import CostSnapshot
from .model_dims import ModelDims
from .placement import Member, PlacementError, kv_token_budget, plan_pipeline
from .scheduler import (
    Candidate,
    Chunk,
    KVView,
    Policy,
    admit_and_preempt,
    apart_lane,
    decode_lane,
    lane_count,
    lanes_open,
    loop_steps,
    microbatch_count,
    next_microbatch,
)
from .sim_pipeline import Clock, Pipeline, SimStep
from .tuner import MicrobatchTuner
from .workload import BenchRequest, summarize


@dataclass(frozen=True)
class SimModel:
    costs: CostSnapshot  # per stage: compute line, link RTT and bandwidth; activation sizes
    kv_tokens: int  # KV budget of the smallest stage, tokens
    master_seconds: float = 0.002  # master work per step
    max_running: int = 64
    # decoder layers per stage: a stage pauses a longer step between them for the decode steps
    # waiting (worker_core.interleave); empty: every step runs whole
    stage_layers: tuple[int, ...] = ()
    # per stage, measured (tokens, seconds) points a step's compute is read from (StageCost.curve);
    # empty: the cost line.  The scheduler decides with the line either way, as the engine does
    stage_curves: tuple[tuple[tuple[float, float], ...], ...] = ()
    # per device (CostSnapshot.device_groups order), cores busy with other work on average: the
    # stages share what is left (a machine's other processes; measured by the real bench)
    device_busy: tuple[float, ...] = ()
    # or, where all stages share one device, as it varied: (from this time on, cores busy), in order
    device_busy_series: tuple[tuple[float, float], ...] = ()
    # CPU seconds a stage's process spends on a step beyond its compute, on its device
    step_overhead: float = 0.0
    # (from this many seconds on, the costs the scheduler decides with), in time order: a real
    # engine's fit moves during a run (a calibration replays it); empty: ``costs`` throughout.
    # The physics uses ``costs`` either way
    plan_costs: tuple[tuple[float, CostSnapshot], ...] = ()


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


@dataclass(frozen=True)
class _Trip:
    """Which micro-batch a step belongs to, and which of its steps it is."""

    lane: int
    plan: list[Chunk]
    k: int  # 0: the step the master sent; then the steps its last stage fed back
    loop: int  # steps fed back after the first
    key: tuple[int, int]  # the load it was planned under (the tuner's), and the micro-batches then
    slots: int


def simulate(model: SimModel, workload: list[BenchRequest], policy: Policy) -> dict:
    run = _Run(model, workload, policy)
    run.until_done()
    return _metrics(run)


class _Run:
    """One simulation: arrivals and micro-batch returns on the event clock, and the requests'
    states.  Decisions are the scheduler's (``admit_and_preempt``, ``microbatch_count``,
    ``next_microbatch``, ``loop_steps``); the physics is :class:`~master_core.sim_pipeline.Pipeline`'s."""

    def __init__(self, model: SimModel, workload: list[BenchRequest], policy: Policy) -> None:
        self.model = model
        self.policy = policy
        self.reqs = [_Req(spec=w, index=i, tokens=w.prompt_tokens) for i, w in enumerate(workload)]
        self.waiting: list[_Req] = []
        self.running: dict[int, _Req] = {}
        self.clock = Clock()
        self.pipe = Pipeline(
            model.costs,
            self.clock,
            self._back,
            self._feed,
            model.stage_layers,
            model.master_seconds,
            model.stage_curves,
            model.device_busy,
            model.step_overhead,
            model.device_busy_series,
        )
        self.lane_busy = [False] * lane_count(policy)  # as the engine's lanes
        self.admitted = 0
        self.prefilling = 0  # lanes whose micro-batch carries prefill
        self.looping = 0  # lanes whose micro-batch loops back
        self.decode_lanes = 0  # lanes whose micro-batch carries decode steps and does not loop back
        self.steps = 0
        self.generated = 0  # output tokens so far (what the tuner measures)
        self.tuner = MicrobatchTuner(policy.max_microbatches)  # as the engine's
        self.peak_kv_tokens = 0  # most KV tokens the running requests held (or had in flight) at once
        for r in self.reqs:
            self.clock.at(r.spec.arrival, lambda r=r: self._arrive(r))

    def until_done(self) -> None:
        self.clock.run()
        if self.running or self.waiting:
            raise RuntimeError(
                f"simulation ended with {len(self.running)} running and {len(self.waiting)} waiting requests"
            )

    def _arrive(self, r: _Req) -> None:
        self.waiting.append(r)
        self._try_lanes(self.clock.now)

    def _back(self, step: SimStep) -> None:
        """A step's result is back at the master: fold it in, free its lane after its last step."""
        trip = cast(_Trip, step.payload)
        before = self.generated
        self._complete(self.clock.now, trip.plan, trip.k)
        prefill = trip.k == 0 and any(ch.length > 1 for ch in trip.plan)
        self.tuner.observe(self.clock.now, trip.key, trip.slots, self.generated - before, prefill)
        self.prefilling -= prefill  # as the engine: from its first step back, a lane loops no prefill
        if trip.k == trip.loop:  # the lane's last step: it is free again
            self.lane_busy[trip.lane] = False
            self.looping -= bool(trip.loop)
            self.decode_lanes -= decode_lane(trip.plan, trip.loop)
            for ch in trip.plan:
                if ch.request_id in self.running:
                    self.running[ch.request_id].in_flight -= 1
        self._try_lanes(self.clock.now)

    def _feed(self, step: SimStep) -> SimStep:
        """The step the last stage feeds back after ``step``: one token of each request."""
        trip = cast(_Trip, step.payload)
        k = trip.k + 1
        self.steps += 1
        n = len(trip.plan)
        return SimStep(n, n, True, k < trip.loop, replace(trip, k=k))

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
        c = self._plan_costs(t)
        slots = microbatch_count(self.policy, c, c.stages, len(self.running))
        key = (0, len(self.running))  # the engine's tuning key: (epoch, running requests)
        if self.policy.dynamic and self.policy.tune:  # as Engine.slots: the model's K, tuned by delivery
            slots = self.tuner.choose(slots, key, len(self.running))
        for lane in range(len(self.lane_busy)):
            if self.lane_busy[lane]:
                continue
            most = self.policy.max_microbatches
            if lane > 0 and lane >= lanes_open(slots, self.looping, True, self.prefilling, most):
                continue  # closed whatever the candidates: not worth building them
            cands = [  # again for each lane planned: the one before changed what is scheduled
                Candidate(r.index, r.scheduled, r.tokens, r.order, r.in_flight, r.computed)
                for r in self.running.values()
            ]
            apart = apart_lane(self.policy, c, cands)
            if lane > 0 and lane >= lanes_open(slots, self.looping, apart, self.prefilling, most):
                continue
            plan = next_microbatch(
                self.policy, c, cands, slots, prefilling=self.prefilling, decode_lanes=self.decode_lanes
            )
            if not plan:
                return
            reqs = [self.running[ch.request_id] for ch in plan]
            ends = all(ch.want_logits and ch.start + ch.length == r.tokens for ch, r in zip(plan, reqs))
            left = [r.spec.output_tokens - r.generated for r in reqs]
            loop = loop_steps(self.policy, c, self.looping, slots, left) if c.loop_back and ends else 0
            for ch, r in zip(plan, reqs):
                r.scheduled = ch.start + ch.length + loop
                r.in_flight += 1
            self.peak_kv_tokens = max(self.peak_kv_tokens, sum(r.scheduled for r in self.running.values()))
            self.lane_busy[lane] = True
            self.prefilling += any(ch.length > 1 for ch in plan)
            self.looping += bool(loop)
            self.decode_lanes += decode_lane(plan, loop)
            tokens, rows = sum(ch.length for ch in plan), sum(ch.want_logits for ch in plan)
            decode = all(ch.length == 1 and ch.start > 0 for ch in plan)  # the stages serve it first
            self.steps += 1
            self.pipe.send(SimStep(tokens, rows, decode, loop > 0, _Trip(lane, plan, 0, loop, key, slots)))

    def _plan_costs(self, t: float) -> CostSnapshot:
        """The costs the scheduler decides with at ``t`` (``SimModel.plan_costs``)."""
        series = self.model.plan_costs
        i = bisect.bisect_right(series, t, key=lambda e: e[0]) - 1
        return series[i][1] if i >= 0 else self.model.costs

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
                self.generated += 1
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
            card_bytes, dims.stage_bytes(a, b, precision, itemsize), dims.token_bytes(a, b, itemsize, 0), cap
        )
        for a, b in plan.ranges
    )
