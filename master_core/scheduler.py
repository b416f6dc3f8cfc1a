"""The scheduler: who runs, in how many micro-batches, with how many prefill tokens.

Contract
--------
Pure: no I/O, no clock of its own, no torch.  The engine asks it, and executes the answer.

* :func:`microbatch_count` — **dynamic micro-batching**: how many micro-batches to keep in
  flight, from measured costs (:mod:`master_core.costs`): the fewest whose token period
  (:func:`token_period`: ``max(cycle_time, K * bottleneck_time)`` for micro-batches of
  ``ceil(active / K)`` decode tokens) is within ``K_GAIN`` of the best.  More micro-batches
  keep the bottleneck resource (a device's compute or one direction of a link) busier, but each
  pays a step's fixed costs: where those dominate (small decode steps on a CPU) one
  micro-batch of every stream is as fast as several and leaves the cores to prefill.
* :func:`chunk_tokens` — **chunk-based prefill transmission**: the prefill tokens one
  micro-batch may carry, chosen just in time so that the chunk's extra time on each resource
  fits in the gap before the next decode micro-batch needs it (``cycle / K`` minus the decode
  work there).  It follows the measured bandwidth and compute: slower links or stages, smaller
  chunks.  A resource is one direction of a link (a stage's input coming down, its output
  going up: a connection carries both at once, and where the master relays a hop both carry
  activations) or a *device*: stages that share one (several workers on one
  machine's cores, one GPU serving two ranges; ``CostSnapshot.devices``) are one resource
  whose time is their work together, so a chunk on one of them is weighed against the decode
  work of all.  Where the gaps are small (a compute-bound device, every step paying a fixed
  cost) the chunk may instead lengthen the trip of the micro-batch carrying it by
  ``decode_stall`` decode cycles (its tokens through every stage and link): whichever allows
  more, so prefill keeps moving in chunks worth their step's fixed cost.  With no request
  decoding, a micro-batch carries a whole step of prefill.
* :func:`next_microbatch` — the engine's and the simulator's one call per micro-batch: its
  share of the decode steps (:func:`microbatch_share`), its prefill (:func:`chunk_tokens`),
  then :func:`plan_microbatch`; or, while streams decode, a long prompt waits and it pays
  (:func:`prefill_apart_pays`: compute-bound stages), prefill in micro-batches of its own.
* :class:`~master_core.tuner.MicrobatchTuner` (its own module) tunes that count online from
  what the micro-batches deliver.
* :func:`plan_microbatch` — one micro-batch: every ready decode step first (a decode step
  never waits behind more than one prefill chunk), then prefill, oldest first, within the
  chunk budget; prefill always gets at least ``min_chunk`` tokens when it waits, so neither
  side starves.  A long prompt may have several chunks in flight (they travel in order).
* :func:`step_bytes` — the byte model of one step on each stage's link (shared with the
  simulator).
* :func:`loop_steps` — how many steps a decode micro-batch runs on its own once sent, where
  the last stage feeds its drawn tokens straight back (``CostSnapshot.loop_back``); once the
  looping micro-batches fill the count, only where the busiest resource would idle; the cost
  model counts the crossings such a step makes (:func:`cycle_time` with ``looped``): the
  master's two are skipped, the loop-back hop is paid.
* :func:`admit_and_preempt` — KV admission control: admit waiting requests while every
  stage's KV budget holds their prompt plus one decode token for each running request; when
  running requests outgrow the budget, preempt the youngest (their caches are dropped and
  they are recomputed later, with the same tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .costs import CostSnapshot

K_GAIN = 0.05  # the fewest micro-batches whose token period is within this much of the best
LOOP_STEPS = 8  # steps a last stage may feed back on its own after one the master sent (:func:`loop_steps`)


@dataclass(frozen=True)
class Policy:
    name: str = "full"
    chunking: bool = True  # just-in-time prefill chunks; False: a whole prompt in one step
    dynamic: bool = True  # micro-batches in flight from measured costs; False: fixed
    fixed_microbatches: int | None = None  # with dynamic False: this many (None: one per stage)
    max_batch_tokens: int = 512  # hard cap on tokens in one step
    # prefill tokens a micro-batch always may carry when prefill waits (16 made short prompts
    # queue: the docs workload's first tokens waited up to 1.3 s, with 32 up to 0.9 s)
    min_chunk: int = 32
    default_chunk: int = 128  # before any cost is measured
    max_microbatches: int = 16
    decode_stall: float = 0.4  # a chunk may lengthen its micro-batch's trip by this many decode cycles
    tune: bool = True  # with dynamic: hill-climb the micro-batch count from measured delivery
    # while streams decode: the compute a micro-batch of prefill alone carries on the slowest
    # stage (the stages pause it between layers for the decode steps waiting)
    prefill_step_seconds: float = 0.25
    prefill_link_seconds: float = 0.1  # and the frames the master relays of it, summed over the links


POLICIES: dict[str, Policy] = {
    "full": Policy("full"),
    "no-chunking": Policy("no-chunking", chunking=False),
    "fixed-microbatches": Policy("fixed-microbatches", dynamic=False),
    "single-microbatch": Policy("single-microbatch", dynamic=False, fixed_microbatches=1),
}


def policy(name: str, max_batch_tokens: int) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return replace(POLICIES[name], max_batch_tokens=max_batch_tokens)


@dataclass(frozen=True)
class Candidate:
    request_id: int
    scheduled: int  # tokens already handed to the pipeline (computed or in flight)
    total: int  # prompt + generated tokens
    order: int  # admission order, smaller is older
    in_flight: int = 0  # chunks of it in the pipeline now
    computed: int | None = None  # tokens whose results are back (None: unknown)

    @property
    def decoding(self) -> bool:
        """Its prompt is computed (or all but its last token): it is producing tokens."""
        done = self.scheduled if self.computed is None else self.computed
        return self.total - done <= 1

    @property
    def paced(self) -> bool:
        """A stream whose pace is at stake: producing tokens, or its whole prompt handed to the
        pipeline (it produces tokens as soon as that comes back)."""
        return self.decoding or self.total - self.scheduled <= 1

    @property
    def ready_decode(self) -> bool:
        """One token left to send and nothing of it in flight: its next step is a decode step."""
        return self.total - self.scheduled == 1 and self.in_flight == 0

    @property
    def waiting_prefill(self) -> bool:
        """Several tokens left to send (a prompt, or a replay).  A long prompt may have several
        chunks in flight; a request reset to replay from position 0 waits until its old chunks
        are out (a chunk at 0 resets the stages' caches)."""
        return self.total - self.scheduled > 1 and (self.in_flight == 0 or self.scheduled > 0)


@dataclass(frozen=True)
class Chunk:
    request_id: int
    start: int  # first position of this chunk
    length: int
    want_logits: bool  # the chunk reaches the end of the request's tokens: sample after it
    rows: int = 1  # with want_logits: logits of its last ``rows`` tokens (drafts to verify: master_core.speculation)

    @property
    def logit_rows(self) -> int:
        return self.rows if self.want_logits else 0


# --------------------------------------------------------------------------- timing model


TOKEN_ID_BYTES = 8  # the first stage receives int64 token ids, not activations


def step_bytes(c: CostSnapshot, stage: int, tokens: int, logits_rows: int) -> tuple[int, int]:
    """(bytes into, bytes out of) ``stage`` for one step of ``tokens`` rows of which
    ``logits_rows`` want logits: token ids into the first stage, activations between stages,
    logits rows out of the last.  The one byte model of the scheduler and the simulator."""
    inbound = tokens * (TOKEN_ID_BYTES if stage == 0 else c.hidden_bytes_per_token)
    outbound = logits_rows * c.logits_bytes_per_row if stage == c.stages - 1 else tokens * c.hidden_bytes_per_token
    return inbound, outbound


def _link_directions(
    c: CostSnapshot, stage: int, tokens: int, logits_rows: int, looped: bool = False
) -> tuple[float, float]:
    """(seconds down, seconds up): how long a step occupies each direction of ``stage``'s link,
    its input coming down unless a direct hop carried it (then it crossed the previous stage's
    link only), its output going up.  A ``looped`` step's input came over the last stage's link,
    which also carries its drawn tokens back to the first stage (besides the result to the
    master).  The two directions are two resources (a TCP connection carries both at once);
    a step's trip crosses them one after the other."""
    inbound, outbound = step_bytes(c, stage, tokens, logits_rows)
    if looped and stage == 0:
        inbound = 0
    if looped and stage == c.stages - 1:
        outbound += tokens * TOKEN_ID_BYTES
    return _on_link(c, stage, 0 if c.direct_into(stage) else inbound), _on_link(c, stage, outbound)


def _on_link(c: CostSnapshot, stage: int, nbytes: int) -> float:
    """Seconds ``nbytes`` occupy ``stage``'s link (none where its bandwidth is unlimited)."""
    bw = c.link_bandwidth[stage]
    return nbytes / bw if math.isfinite(bw) and bw > 0 else 0.0


def _resource_times(
    c: CostSnapshot, tokens: int, logits_rows: int, looped: bool = False
) -> tuple[list[float], list[float]]:
    """Of one step of ``tokens``: per stage its compute seconds, and per link direction (each
    stage's down, then up) the seconds the step occupies it."""
    compute = [c.stage_fixed[i] + c.stage_per_token[i] * tokens for i in range(c.stages)]
    return compute, [t for i in range(c.stages) for t in _link_directions(c, i, tokens, logits_rows, looped)]


def _delays(c: CostSnapshot, looped: bool = False) -> float:
    """One-way delays of a micro-batch's trip: each link's round trip, less the down half of
    every stage fed over a direct hop, and of the first stage when a ``looped`` step came
    straight from the last (whose up half, the loop-back hop, it paid instead of the master's;
    not through a relay: that crosses the first stage's link as well)."""
    looped_in = looped and not c.loop_back_relayed
    fed = sum(c.link_rtt[i] / 2 for i in range(c.stages) if c.direct_into(i) or (looped_in and i == 0))
    return sum(c.link_rtt) - fed


def _shared(per_stage: Sequence[float], stages: Sequence[int], slots: int) -> float:
    """Busy seconds of a device whose ``stages`` need ``per_stage`` seconds each: they run
    ``slots`` at a time, and no stage's own work is split (a step runs on one slot)."""
    work = [per_stage[i] for i in stages]
    return max(max(work), sum(work) / slots)


def _device_times(c: CostSnapshot, compute: Sequence[float]) -> list[float]:
    """Busy seconds of each device for a step whose stages compute for ``compute`` seconds."""
    return [_shared(compute, stages, slots) for stages, slots in c.device_groups()]


def cycle_time(c: CostSnapshot, tokens: int, logits_rows: int, looped: bool = False) -> tuple[float, float]:
    """(seconds for one micro-batch to go through the whole pipeline and back,
    seconds it occupies the busiest single resource: a device, or a link direction).  ``looped``: a
    decode step fed back by the last stage (only where ``c.loop_back``): from the last stage
    straight to the first, the master not crossed."""
    looped = looped and c.loop_back
    compute, link = _resource_times(c, tokens, logits_rows, looped)
    cycle = sum(compute) + sum(link) + _delays(c, looped)
    return cycle, max(_device_times(c, compute) + link)


def microbatch_count(p: Policy, costs: CostSnapshot | None, stages: int, active: int) -> int:
    if not p.dynamic:
        return max(1, p.fixed_microbatches or stages)
    if costs is None or costs.stages != stages:
        return max(1, min(stages, max(1, active)))
    limit = max(1, min(p.max_microbatches, active))
    periods = [token_period(costs, k, active) for k in range(1, limit + 1)]
    best = min(periods)
    return next(k for k, t in enumerate(periods, 1) if t <= best * (1 + K_GAIN))


def token_period(c: CostSnapshot, k: int, active: int) -> float:
    """Seconds between two tokens of every request when ``active`` decode steps travel in ``k``
    micro-batches: a trip around the pipeline, or ``k`` turns of the busiest resource when they
    queue there, whichever is longer.  Each micro-batch pays every step's fixed costs, so more
    of them is not always faster."""
    b = math.ceil(max(1, active) / k)
    cycle, bottleneck = cycle_time(c, b, b, looped=True)
    return max(cycle, k * bottleneck)


def _link_token_seconds(c: CostSnapshot, stage: int) -> float:
    """Seconds one more token of a step spends crossing ``stage``'s link (both directions)."""
    return sum(_link_directions(c, stage, 1, 0))


def _whole_token_seconds(c: CostSnapshot, stage: int) -> float:
    """Seconds one more token of a step occupies ``stage``'s link in a frame sent whole: the
    master's (``stage``'s input, unless a direct hop carries it)."""
    inbound, _ = step_bytes(c, stage, 1, 0)
    return _on_link(c, stage, 0 if c.direct_into(stage) else inbound)


def _gap_tokens(c: CostSnapshot, decode_tokens: int, microbatches: int) -> float:
    """Prefill tokens that fit in the gap before the next decode micro-batch needs the busiest
    resource: ``cycle / K`` minus the decode work on it, over the per-token cost there."""
    cycle, _ = cycle_time(c, max(1, decode_tokens), max(1, decode_tokens), looped=True)
    spacing = cycle / max(1, microbatches)
    compute_d, link_d = _resource_times(c, decode_tokens, decode_tokens, c.loop_back)
    resources = list(zip(_device_times(c, compute_d), _device_times(c, c.stage_per_token)))
    per_token = [t for i in range(c.stages) for t in _link_directions(c, i, 1, 0)]
    resources += list(zip(link_d, per_token))
    best = math.inf
    for busy, per in resources:
        if per > 0:
            best = min(best, max(0.0, spacing - busy) / per)
    return best


def chunk_tokens(
    p: Policy, costs: CostSnapshot | None, decode_tokens: int, microbatches: int, *, decoding: int | None = None
) -> int:
    """Prefill tokens the next micro-batch may carry beside ``decode_tokens`` decode steps, with
    ``microbatches`` in flight and ``decoding`` requests producing tokens (None: unknown, assume
    some): what fits in the gap before the next decode micro-batch needs the busiest resource
    (:func:`_gap_tokens`; a device shared by several stages counts their work together) or what
    lengthens this micro-batch's trip by ``decode_stall`` decode cycles (:func:`_stall_tokens`),
    whichever is more; at least ``min_chunk`` (prefill never starves), at most the step's room.
    With nobody decoding no pace is at stake: a whole step."""
    room = max(0, p.max_batch_tokens - decode_tokens)
    if not p.chunking or decoding == 0:
        return room
    if costs is None:
        return min(room, p.default_chunk)
    best = max(_gap_tokens(costs, decode_tokens, microbatches), _stall_tokens(p, costs, decode_tokens))
    return max(min(p.min_chunk, room), min(room, int(min(best, room))))


def _stall_tokens(p: Policy, costs: CostSnapshot, decode_tokens: int) -> float:
    """Prefill tokens whose trip through every resource (each stage's compute, each link in and
    out) takes ``decode_stall`` decode cycles: the most a chunk may lengthen the micro-batch that
    carries it, whatever the gaps."""
    d = max(1, decode_tokens)
    cycle, _ = cycle_time(costs, d, d, looped=True)
    per = sum(costs.stage_per_token) + sum(_link_token_seconds(costs, i) for i in range(costs.stages))
    return p.decode_stall * cycle / per if per > 0 else math.inf


# --------------------------------------------------------------------------- one micro-batch


def plan_microbatch(
    candidates: Sequence[Candidate], *, max_decodes: int, prefill_tokens: int, min_chunk: int = 1
) -> list[Chunk]:
    """Decode steps first (at most ``max_decodes``), then prefill chunks within
    ``prefill_tokens`` (at least ``min_chunk`` when prefill waits)."""
    decodes = sorted((c for c in candidates if c.ready_decode), key=lambda c: c.order)
    prefills = sorted((c for c in candidates if c.waiting_prefill), key=lambda c: c.order)
    chunks = [Chunk(c.request_id, c.scheduled, 1, True) for c in decodes[: max(0, max_decodes)]]
    budget = max(prefill_tokens, min_chunk if prefills else 0)
    for c in prefills:
        if budget <= 0:
            break
        n = min(c.total - c.scheduled, budget)
        chunks.append(Chunk(c.request_id, c.scheduled, n, c.scheduled + n == c.total))
        budget -= n
    return chunks


def microbatch_share(active: int, slots: int) -> int:
    """Decode steps per micro-batch so that ``slots`` micro-batches split ``active`` requests."""
    return max(1, math.ceil(active / max(1, slots)))


def prefill_step_tokens(p: Policy, costs: CostSnapshot) -> int:
    """Tokens of a micro-batch of prefill alone: about ``p.prefill_step_seconds`` of compute on
    the slowest stage, and the frames the master relays of it (a stage's input, unless it came
    over a direct hop) for at most ``p.prefill_link_seconds`` summed over the links, at least
    ``p.min_chunk``, within the step's cap.  The bound was set while the master sent those
    frames whole, a decode step's frame waiting behind one on each link.  Since it sends them in
    pieces (:mod:`master_core.link`) that wait is gone, but bursts measured without the bound
    were worse on every shaped profile (p99 gap over the calm pace 2.51 / 2.17 / 2.13 on
    wan / slow / home against 2.29 / 1.99 / 1.97 with it, one run each, 2026-12-06), so it stays."""
    return _prefill_tokens(p, costs, sum(_whole_token_seconds(costs, i) for i in range(costs.stages)))


def _prefill_tokens(p: Policy, costs: CostSnapshot, link: float) -> int:
    """Tokens of about ``p.prefill_step_seconds`` of compute on the slowest stage that take at most
    ``p.prefill_link_seconds`` at ``link`` seconds a token, at least ``p.min_chunk``, within the cap."""
    per = max(costs.stage_per_token)
    tokens = min(
        p.prefill_step_seconds / per if per > 0 else math.inf,
        p.prefill_link_seconds / link if link > 0 else math.inf,
    )
    return min(p.max_batch_tokens, max(p.min_chunk, int(min(tokens, p.max_batch_tokens))))


def prefill_lanes(costs: CostSnapshot, tokens: int) -> int:
    """Micro-batches of ``tokens`` of prefill alone to keep in flight: the fewest that keep the
    bottleneck resource busy for a whole trip (``L * bottleneck >= cycle``), at most one per
    stage and link crossing."""
    cycle, bottleneck = cycle_time(costs, tokens, 1)
    if bottleneck <= 0:
        return 1
    return max(1, min(2 * costs.stages, math.ceil(cycle / bottleneck)))


def prefill_apart_pays(p: Policy, costs: CostSnapshot) -> bool:
    """Whether keeping prefill apart from decode pays: a micro-batch of prefill alone
    (:func:`prefill_step_tokens`) spends at least as long on its tokens as on the step's fixed
    cost on the stage slowest per token, its tokens counted at their compute there or at their
    bytes on the busiest link the master relays a hop over, whichever is longer.  On a
    compute-bound stage (a CPU) a chunk inside a decode step would hold that step for the
    chunk's whole compute, while apart it is paused between layers; where the master relays, a
    chunk holds the decode step that carries it for its bytes on every link it crosses (the
    simulated 70B groups on ``slow``, 4 relayed cards: the gaps' p99 4.1 s riding, 0.87 s apart);
    on a memory-bound stage whose hops are direct (a GPU reading its weights once a step) tokens
    ride along almost free, and a step of prefill alone would pay the whole fixed cost again for
    a few dozen tokens (the simulated 70B groups: prompts waited 93 s instead of 0.9 s; on 8 cards
    with direct hops on ``wan``, forced apart, 5.5 s instead of 1.5 s at the median, 2026-12-07).  The step
    it weighs is sized as it was when this rule was measured, its output whole on the slowest
    link: since the workers' outputs go in pieces, a pipeline of direct hops sizes its steps by
    compute alone (up to the cap), and on GPUs that made big steps of prefill alone pay, though
    they still cost the simulated groups a tenth of their throughput against riding along."""
    i = max(range(costs.stages), key=lambda s: costs.stage_per_token[s])
    slowest = max(_link_token_seconds(costs, s) for s in range(costs.stages))
    relayed = max(_whole_token_seconds(costs, s) for s in range(costs.stages))
    return max(costs.stage_per_token[i], relayed) * _prefill_tokens(p, costs, slowest) >= costs.stage_fixed[i]


def long_prompt(p: Policy, costs: CostSnapshot, c: Candidate) -> bool:
    """Is ``c`` a prompt (or a replay) not computed yet (waiting, or its last chunks on their way),
    longer in all than a step of prefill alone (:func:`prefill_step_tokens`: its compute on the
    slowest stage, ``p.prefill_step_seconds``, and the frames the master relays of it)?  (Its
    compute alone, before 2026-12-07: where the master relays, a chunk riding in a decode step
    holds it for the chunk's bytes on every link, and a 900-token prompt on a GPU was not long.)
    Only such a prompt makes prefill travel apart
    (:func:`next_microbatch`), until its last chunk is back: were the decode steps shared out
    over the slots while that chunk still held a lane, a stream's step found no slot left and
    waited for it (emulated ``wan`` and ``slow`` without the loop-back: gaps of 1.4 and 1.6 s
    as the burst's last prompt ended)."""
    return not c.decoding and c.total > prefill_step_tokens(p, costs)


def prefill_apart(p: Policy, costs: CostSnapshot | None, candidates: Sequence[Candidate]) -> bool:
    """Does prefill travel apart from decode now: with chunking and measured costs, while a stream
    decodes (or its prompt is on its way) and a long prompt waits (:func:`long_prompt`), where
    :func:`prefill_apart_pays`?"""
    return (
        p.chunking
        and costs is not None
        and any(c.paced for c in candidates)
        and any(long_prompt(p, costs, c) for c in candidates)
        and prefill_apart_pays(p, costs)
    )


def apart_lane(p: Policy, costs: CostSnapshot | None, candidates: Sequence[Candidate]) -> bool:
    """Does prefill alone get a lane beyond the slots (:func:`lanes_open`): while prefill travels
    apart (:func:`prefill_apart`) where decode steps do not loop back?  There the decode steps
    hold the master's lanes; where they loop back they leave them, and those carry the prefill
    (one more lane there put a third step of prefill alone in flight on emulated ``wan`` and the
    burst's p99 over the calm pace was 3.03, against 2.10-2.54 in the runs before)."""
    return prefill_apart(p, costs, candidates) and costs is not None and not costs.loop_back


def next_microbatch(
    p: Policy,
    costs: CostSnapshot | None,
    candidates: Sequence[Candidate],
    slots: int,
    prefilling: int = 0,
    decode_lanes: int = 0,
) -> list[Chunk]:
    """The next micro-batch of ``slots`` in flight over the running requests ``candidates``, of
    which ``prefilling`` micro-batches carry prefill now and ``decode_lanes`` carry decode steps
    (the master's, not those that loop back): its share of the ready decode steps,
    then prefill within :func:`chunk_tokens`.

    While streams decode and a long prompt waits (longer than a step of prefill alone's compute;
    with chunking and measured costs, where :func:`prefill_apart_pays`: :func:`prefill_apart`),
    prefill travels apart: the ready decode steps go without prefill, at most the streams' share
    of the slots (:func:`microbatch_share`) in one micro-batch, while fewer than ``slots`` such
    micro-batches are in flight; a micro-batch with no decode step
    ready, or with the slots full, carries prefill alone (:func:`prefill_step_tokens`; at most
    :func:`prefill_lanes` in flight), on the lane :func:`lanes_open` adds for it.  Decode steps
    that find the slots full wait for the next decode micro-batch back, and go with its steps.
    (Before 2026-12-07 every ready decode step went in that one micro-batch: two lanes back at
    once merged and never split again, and one micro-batch came to carry most streams, its trip
    as long as its bytes over every link.  8 simulated 70B cards the master relays on ``slow``,
    64 requests running: decode micro-batches of up to 30-46 rows, trips' p50 3-4 s, 0.70 of the
    bound, gaps' p50 / p99 1.3 / 4.8 s; at most their share: up to 3 rows, 0.6-0.8 s, 0.86 of
    the bound, 0.7 / 0.8 s.)
    (A first decode micro-batch that took a chunk along while no prefill was in flight split the
    streams over two lanes in the relayed lab, each finding decode steps ready, and prefill rode
    in 32-token chunks in one of them: the prompts took twice as long and the gaps' p99 grew.
    Without the slots' bound the streams, split over three micro-batches before the burst, kept
    all the lanes open and no prefill went for 15 s at a time: emulated ``home`` without the
    loop-back, the last prompt answered after 53 s.)
    Each stage pauses such a step between layers and serves the decode steps waiting
    (:mod:`worker_core.interleave`), so a stream waits for a few layers, not
    for a prompt, and its steps pay the fixed cost of a step once for their share.  Short prompts
    ride in the decode steps' chunks instead: kept apart they travelled several together, a
    step that the stages pause for every decode step, and each waited for the whole of it (the
    docs workload's first tokens: p50 0.8 s, max 1.9 s; riding, 0.4 and 0.9 s).  A prompt
    counts as long by its whole length, not what is left of it: its last chunks stay apart too.
    The engine and the simulator plan through this one function."""
    ready = sum(1 for c in candidates if c.ready_decode)
    # a stream whose prompt is on its way counts: a whole step of prefill sent now would be
    # ahead of its first decode step at every stage
    decoding = sum(1 for c in candidates if c.paced)
    apart = prefill_apart(p, costs, candidates)
    cap = p.max_batch_tokens  # no step exceeds it (the stages refuse one that does)
    if apart and ready and decode_lanes < slots:
        share = microbatch_share(decoding, slots)
        return plan_microbatch(candidates, max_decodes=min(share, ready, cap), prefill_tokens=0, min_chunk=0)
    if apart:
        assert costs is not None
        tokens = prefill_step_tokens(p, costs)
        if prefilling >= prefill_lanes(costs, tokens):
            return []
        return plan_microbatch(candidates, max_decodes=0, prefill_tokens=tokens)
    decodes = min(microbatch_share(len(candidates), slots), ready, cap)
    prefill = chunk_tokens(p, costs, decodes, slots, decoding=decoding)
    return plan_microbatch(
        candidates, max_decodes=decodes, prefill_tokens=prefill, min_chunk=min(p.min_chunk, cap - decodes)
    )


def loop_steps(p: Policy, costs: CostSnapshot | None, looping: int, slots: int, left: Sequence[int]) -> int:
    """Steps after this one that the last stage may feed back on its own (where the pipeline
    loops back) for a micro-batch whose requests may each still take ``left`` tokens, this
    step's included: at most ``LOOP_STEPS``.  None while ``looping`` lanes already loop and only
    one would be left for the master (it admits arrivals and prefills them meanwhile); none
    either once the looping lanes fill the ``slots`` and one more such micro-batch would only
    wait for the busiest resource (:func:`_idle_room`).  A loop keeps its micro-batch as it
    began (nobody joins it): streams that arrived one by one would each loop alone, as many
    micro-batches as streams, each paying a step's fixed cost at every stage; back on the
    master's lanes they go together."""
    if looping + 1 >= p.max_microbatches or not left:
        return 0
    if looping >= slots and costs is not None and not _idle_room(costs, looping + 1, len(left)):
        return 0
    return max(0, min(LOOP_STEPS, *(n - 1 for n in left)))


def _idle_room(c: CostSnapshot, k: int, tokens: int) -> bool:
    """Do ``k`` looped micro-batches of ``tokens`` decode steps leave the busiest resource (a
    device, or a link) idle part of a trip (a latency-bound pipeline), so that the last of them
    does not just queue behind the others?"""
    cycle, bottleneck = cycle_time(c, tokens, tokens, looped=True)
    return k * bottleneck < cycle


def decode_lane(chunks: Sequence[Chunk], loop: int) -> bool:
    """Does a micro-batch count among :func:`next_microbatch`'s ``decode_lanes``: it carries a
    decode step (a drafted one too) and does not loop back (``loop`` steps)?"""
    return not loop and any(c.length == 1 or c.rows > 1 for c in chunks)


def lane_count(p: Policy) -> int:
    """Lanes the master keeps (the engine's lane tasks, the simulator's): ``p.max_microbatches``
    for the slots and the lanes looping back, and as many again for prefill alone
    (:func:`lanes_open`).  With only ``max_microbatches`` in all, a pipeline whose slots reached
    the cap had no lane left for prefill alone and its prompts waited (8 simulated cards, every
    hop relayed, on ``slow``, prefill apart, steps of at most 512 tokens: TTFT p50 430-467 s with
    no such lane or one, 165 s with the room)."""
    return 2 * p.max_microbatches


def lanes_open(slots: int, looping: int, apart: bool = False, prefilling: int = 0, most: int = 0) -> int:
    """Lanes that may plan a micro-batch: the ``slots``, one more for each lane that loops (a
    looping lane needs no slot: the master admits arrivals and prefills them meanwhile), and
    where ``apart`` (:func:`apart_lane`) one more for prefill alone, or one for each of the
    ``prefilling`` lanes that carry it now: such a lane takes no slot either.  (Counted in the
    slots, when the slots shrank while three decode lanes were out, those that came back carried
    prefill and the streams' steps found every open lane taken: a 1.2 s gap in the relayed lab.)
    Without that lane, where no decode
    step loops back, the decode lanes always found a decode step ready and a long prompt only
    ever rode along in their steps (the relayed lab: 32 tokens in every step, each
    decode step about twice its calm time, burst p99 over the calm pace 2.33-2.73; with it 2.28).
    With a lane for each of :func:`prefill_lanes` instead of one, the relayed lab's prompts took
    as long (20.7 s for the last against 21.2 s) and the p99 grew (2.58): its stages share two cores.
    The slots and the looping lanes together stay within ``most`` (``Policy.max_microbatches``; 0:
    no bound), as when the master kept only that many lanes; prefill alone's lanes come on top
    (:func:`lane_count`)."""
    kept = min(slots + looping, most) if most > 0 else slots + looping
    return kept + (max(1, prefilling) if apart else 0)


# --------------------------------------------------------------------------- KV memory


@dataclass(frozen=True)
class KVView:
    request_id: int
    total: int  # prompt + generated tokens
    order: int
    in_flight: bool


def admit_and_preempt(
    running: Sequence[KVView], waiting: Sequence[tuple[int, int]], budget: int, max_running: int
) -> tuple[list[int], list[int]]:
    """Return (request ids to admit, request ids to preempt).

    ``waiting`` is (request id, tokens it must prefill) in queue order.  The KV that running
    requests need next is what they hold plus what they still must compute; a request that
    cannot fit even alone is never admitted (the engine rejects it earlier).
    """
    need = {r.request_id: r.total + 1 for r in running}  # everything computed, plus the next token
    used = sum(need.values())
    preempt: list[int] = []
    if used > budget:
        for r in sorted(running, key=lambda r: -r.order):  # youngest first
            if used <= budget:
                break
            if r.in_flight or len(running) - len(preempt) <= 1:
                continue
            preempt.append(r.request_id)
            used -= need[r.request_id]
    admit: list[int] = []
    slots = max_running - (len(running) - len(preempt))
    if not preempt:
        for rid, tokens in waiting:
            if slots <= 0 or used + tokens + 1 > budget:
                break
            admit.append(rid)
            used += tokens + 1
            slots -= 1
    return admit, preempt
