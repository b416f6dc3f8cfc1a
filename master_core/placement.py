"""Place contiguous ranges of decoder layers on the members of a group.

Contract: pure.  ``kv_token_budget`` turns memory left after weights into a KV cache size
in tokens.  ``layers_held(shape, memory)`` is how many layers one member's memory holds.
``replacement`` picks the member that takes over one lost stage's range as it is;
``widening`` the neighbour or two that take it over beside their own ranges where none can;
``standby_range`` the span of consecutive stage ranges a standby member too small for the whole
model keeps loaded.
``planner_members`` turns what the workers announced (memory offered, measured
speed, measured link) into planner members timed on a reference step.

``plan_pipeline(shape, members)``: given each member's memory, measured speed and link, it
picks the pipeline order and contiguous ranges that minimise the busiest resource (so maximise
throughput), honouring every member's memory (weights, embeddings on the first stage, head
on the last, a KV reserve per layer); among equally fast plans it prefers the one in which
every member takes part.  Raises :class:`PlacementError` saying what is missing.

The cost model is a pipeline kept full by micro-batches: a stage's compute and its link's
transfers overlap (the worker reads the next frame while it computes), so a step's time is
the slowest of every used stage's compute (its layers times its time per layer) and every
used member's link time.  A link's time does not depend on how many layers sit behind it
(the activations are the same size), so a slow link never changes how many layers a member
gets; it decides whether the member is worth using: a member whose link is slower than what
the others reach without it is left out when memory allows.

How it plans (exact, polynomial).  Under this model a stage's time depends only on its own
member and layer count, never on its neighbours, and the order matters only through which
member is first (it also holds the embeddings) and which is last (the head); the middle
members may stand in any order.  So whether a time limit ``T`` is reachable is decided in
O(n): every member takes what ``T`` and its memory allow, and the first and last stages go
to the two members that lose the fewest layers to the embeddings and the head.  The best
``T`` is one of at most n * (layers + 1) values (a member's link time, or c layers at a
member's speed), so a binary search over them finds the exact optimum in
O(n * layers * log(n * layers)); no permutation is ever enumerated.  Then every member that
can take a layer within that time takes part, and the layers are spread to make the slowest
compute stage as fast as possible.  (Were a hop's time to depend on the pair of neighbours,
as with direct stage-to-stage links, ordering would become a bottleneck travelling-salesman
problem, NP-hard in general; this model does not have that term.)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

TIME_SLACK = (
    1e-9  # layers: rounding slack when a time limit is divided by a time per layer (c * t / t may land below c)
)
LINK_SLACK = (
    1e-12  # seconds: rounding slack when a member's link time is compared with a limit taken from the same floats
)
REF_ROWS = 32  # the reference step the planner times: one micro-batch of 32 rows
LINK_NOISE = 0.010  # seconds: link times closer than this to the group's best count as equal
KV_RESERVE_TOKENS = 2048  # KV room every stage must have beside its weights, in tokens


class PlacementError(ValueError):
    """The group cannot hold the model."""


def kv_token_budget(free_bytes: int, weight_bytes: int, bytes_per_token: int, cap: int) -> int:
    """KV tokens a stage can hold: half of what is left after its weights, at most ``cap``."""
    spare = max(0, free_bytes - weight_bytes) // 2
    return max(1, min(cap, spare // max(1, bytes_per_token)))


# --------------------------------------------------------------------------- unequal machines


@dataclass(frozen=True)
class Member:
    name: str
    memory: int  # bytes usable for weights + KV
    seconds_per_layer: float  # compute time of one layer for one reference step (measured)
    link_seconds: float = 0.0  # time one reference step spends on this member's link


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    layer_bytes: int  # weights of one decoder layer
    first_bytes: int  # extra weights of the first stage (input embeddings)
    last_bytes: int  # extra weights of the last stage (final norm + LM head)
    kv_bytes_per_layer: int  # KV bytes per layer reserved on every stage (KV budget)


@dataclass(frozen=True)
class Plan:
    order: tuple[str, ...]  # members used, in pipeline order
    ranges: tuple[tuple[int, int], ...]
    step_seconds: float  # the bottleneck stage's time per reference step


def _weight_bytes(shape: ModelShape, layers: int, first: bool, last: bool) -> int:
    """Weights of a stage of ``layers`` layers (with the embeddings when ``first``, the head when ``last``)."""
    return layers * shape.layer_bytes + (shape.first_bytes if first else 0) + (shape.last_bytes if last else 0)


def _stage_bytes(shape: ModelShape, layers: int, first: bool, last: bool) -> int:
    return _weight_bytes(shape, layers, first, last) + layers * shape.kv_bytes_per_layer


@dataclass(frozen=True)
class _Room:
    """Most layers a member's memory holds at each position (time not counted)."""

    first: int  # with the embeddings
    middle: int
    last: int  # with the head
    alone: int  # with both: the whole pipeline on one member

    def at(self, first: bool, last: bool) -> int:
        if first and last:
            return self.alone
        return self.first if first else self.last if last else self.middle


def _room(shape: ModelShape, m: Member) -> _Room:
    per = shape.layer_bytes + shape.kv_bytes_per_layer  # bytes one layer takes, weights and KV reserve

    def fit(extra: int) -> int:
        left = m.memory - extra
        if left < 0:
            return 0
        return shape.num_layers if per <= 0 else min(shape.num_layers, left // per)

    return _Room(fit(shape.first_bytes), fit(0), fit(shape.last_bytes), fit(shape.first_bytes + shape.last_bytes))


def layers_held(shape: ModelShape, memory: int) -> int:
    """Most decoder layers (weights and KV reserve) a member offering ``memory`` bytes holds in
    the middle of a pipeline (no embeddings, no head)."""
    return _room(shape, Member("", memory, 1.0)).middle


def replacement(shape: ModelShape, members: Sequence[Member], start: int, end: int) -> int | None:
    """Index of the member best placed to take over the stage of layers ``[start, end)`` as it
    is (the other stages keep theirs, :mod:`master_core.rebuild`): among those whose memory
    holds it (with the embeddings when it starts at 0, the head when it ends the model), the
    one whose compute or link would be the smaller bottleneck; None when none holds it."""
    first, last = start == 0, end == shape.num_layers
    fits = [i for i, m in enumerate(members) if _room(shape, m).at(first, last) >= end - start]
    if not fits:
        return None
    return min(fits, key=lambda i: max((end - start) * members[i].seconds_per_layer, members[i].link_seconds))


def widening(
    shape: ModelShape, ranges: Sequence[tuple[int, int]], lost: int, neighbours: dict[int, Member]
) -> tuple[tuple[int, tuple[int, int]], ...] | None:
    """Where no standby member takes over stage ``lost`` of a pipeline of ``ranges``: the
    neighbours (indices into ``ranges``: ``lost - 1``, ``lost + 1``, of the members by stage in
    ``neighbours``; any others there are not considered) that take
    its layers over beside their own, each with its widened range, in pipeline order.  One
    neighbour where its memory holds its own range and the lost one (of two that can, the one
    whose widened stage computes faster); else both, the lost range cut where the slower of the
    two widened stages computes fastest and each memory holds its part; None when neither way
    fits (the whole pipeline is then planned again)."""
    a, b = ranges[lost]
    near = {j: m for j, m in neighbours.items() if j in (lost - 1, lost + 1) and 0 <= j < len(ranges)}

    def fits(m: Member, r: tuple[int, int]) -> bool:
        return replacement(shape, [m], *r) is not None

    def seconds(m: Member, r: tuple[int, int]) -> float:
        return (r[1] - r[0]) * m.seconds_per_layer

    options: list[tuple[float, tuple[tuple[int, tuple[int, int]], ...]]] = []
    for j, m in sorted(near.items()):
        wide = (ranges[j][0], b) if j < lost else (a, ranges[j][1])
        if fits(m, wide):
            options.append((seconds(m, wide), ((j, wide),)))
    if not options and len(near) == 2:
        before, after = near[lost - 1], near[lost + 1]
        for cut in range(a + 1, b):
            lo, hi = (ranges[lost - 1][0], cut), (cut, ranges[lost + 1][1])
            if fits(before, lo) and fits(after, hi):
                options.append((max(seconds(before, lo), seconds(after, hi)), ((lost - 1, lo), (lost + 1, hi))))
    return min(options, key=lambda o: o[0])[1] if options else None


def standby_range(
    shape: ModelShape, ranges: Sequence[tuple[int, int]], m: Member, taken: Sequence[tuple[int, int]] = ()
) -> tuple[int, int] | None:
    """The layers ``(start, end)`` a standby member ``m`` whose memory does not hold the whole
    model keeps loaded, so that a repair of any stage inside them takes its layers from memory:
    a span of one or more consecutive ``ranges`` (the serving stages', in pipeline order) that
    its memory holds as a stage of that span (:func:`replacement`: with the embeddings when it
    starts at layer 0, the head when it ends the model).  Of those, the one whose weights are the
    most bytes (its layers', and the embeddings or head counted with it), the first of equals;
    a span another standby member keeps (``taken``) is left to it.  None when its memory holds
    no stage's range."""
    best: tuple[int, tuple[int, int]] | None = None
    for i, (start, _) in enumerate(ranges):
        for _, end in ranges[i:]:
            if replacement(shape, [m], start, end) is None:
                break  # a longer span from the same start holds more
            weights = _weight_bytes(shape, end - start, start == 0, end == shape.num_layers)
            if (start, end) not in taken and (best is None or weights > best[0]):
                best = (weights, (start, end))
    return None if best is None else best[1]


def _by_time(shape: ModelShape, m: Member, limit: float) -> int:
    """Most layers ``m`` computes within ``limit`` seconds (its link counted apart)."""
    if m.seconds_per_layer <= 0:
        return shape.num_layers
    return max(0, min(shape.num_layers, math.floor(limit / m.seconds_per_layer + TIME_SLACK)))


def _link_ok(m: Member, limit: float) -> bool:
    return m.link_seconds <= limit + LINK_SLACK


def _ends(
    shape: ModelShape, members: Sequence[Member], rooms: Sequence[_Room], limit: float, pool: Sequence[int], every: bool
) -> tuple[int, int] | None:
    """(first, last): the ends of a pipeline of two or more members of ``pool`` whose stages,
    each within ``limit``, hold every layer, or None when there is none.  The middle members
    may stand in any order, so only the ends matter: the two members that lose the fewest
    layers to the embeddings and the head.  ``every``: all of ``pool`` must take a layer and
    links are not counted (they were when ``pool`` was chosen); else members whose link is
    slower than ``limit`` or who cannot take a layer are left out.  O(len(pool))."""
    layers = shape.num_layers
    if layers < 2:
        return None
    total = 0  # layers the middle positions would hold
    heads: list[tuple[int, int]] = []  # (layers lost by being first, -index)
    tails: list[tuple[int, int]] = []
    used = 0
    for i in pool:
        m, room = members[i], rooms[i]
        t = _by_time(shape, m, limit) if every or _link_ok(m, limit) else 0
        mid = min(t, room.middle)
        if mid < 1:
            if every:
                return None
            continue
        used += 1
        total += mid
        if min(t, room.first) >= 1:
            heads.append((min(t, room.first) - mid, -i))
        if min(t, room.last) >= 1:
            tails.append((min(t, room.last) - mid, -i))
    if used < 2:
        return None
    best: tuple[int, int, int] | None = None  # (gain, -first, -last): most layers, then earliest members
    for gh, nh in heapq.nlargest(2, heads):
        for gt, nt in heapq.nlargest(2, tails):
            if nh != nt and (best is None or (gh + gt, nh, nt) > best):
                best = (gh + gt, nh, nt)
    if best is None or total + best[0] < layers:
        return None
    return -best[1], -best[2]


def _alone(shape: ModelShape, members: Sequence[Member], rooms: Sequence[_Room], limit: float) -> int | None:
    """A member that holds the whole model by itself within ``limit`` (fastest, then earliest)."""
    fits = [
        (max(m.link_seconds, shape.num_layers * m.seconds_per_layer), i)
        for i, (m, room) in enumerate(zip(members, rooms))
        if _link_ok(m, limit) and min(_by_time(shape, m, limit), room.alone) >= shape.num_layers
    ]
    return min(fits)[1] if fits else None


def _lowest(values: Sequence[float], ok: Callable[[float], bool]) -> float | None:
    """Smallest of the sorted ``values`` for which the monotone ``ok`` holds (binary search)."""
    if not values or not ok(values[-1]):
        return None
    lo, hi = -1, len(values) - 1  # ok(values[hi]) holds; every index <= lo fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(values[mid]):
            hi = mid
        else:
            lo = mid
    return values[hi]


def _spread(shape: ModelShape, members: Sequence[Member], rooms: Sequence[_Room], order: Sequence[int]) -> list[int]:
    """Layer counts for ``order`` (first and last fixed) making the slowest compute stage as
    fast as possible: one layer each, then every further layer to the stage that would be
    fastest with it (greedy is optimal for this min-max with per-stage caps)."""
    n = len(order)
    counts = [1] * n
    caps = [rooms[i].at(k == 0, k == n - 1) for k, i in enumerate(order)]
    heap = [((2 * members[i].seconds_per_layer), k) for k, i in enumerate(order) if caps[k] > 1]
    heapq.heapify(heap)
    for _ in range(shape.num_layers - n):
        _, k = heapq.heappop(heap)  # callers checked that the caps hold every layer
        counts[k] += 1
        if counts[k] < caps[k]:
            heapq.heappush(heap, ((counts[k] + 1) * members[order[k]].seconds_per_layer, k))
    return counts


def plan_pipeline(shape: ModelShape, members: Sequence[Member], max_exhaustive: int | None = None) -> Plan:
    """Choose the order and contiguous ranges that minimise the slowest stage's time
    (maximise throughput), exactly, in polynomial time (see the module docstring); among
    equally fast plans, the one with the most members taking part.  ``max_exhaustive`` is
    accepted for old callers and ignored: no ordering is enumerated at any size.  Raises
    :class:`PlacementError` saying what is missing when nothing fits."""
    del max_exhaustive
    if not members:
        raise PlacementError("no members to place the model on")
    need = _stage_bytes(shape, shape.num_layers, True, True)
    have = sum(m.memory for m in members)
    if have < need:
        raise PlacementError(
            f"the group holds {have / 1e9:.1f} GB but the model needs {need / 1e9:.1f} GB (weights + KV reserve): "
            f"{(need - have) / 1e9:.1f} GB more, e.g. one more member with that much free memory"
        )
    biggest = max(m.memory for m in members)
    if biggest < shape.layer_bytes + shape.kv_bytes_per_layer + max(shape.first_bytes, 0) and len(members) == 1:
        raise PlacementError("no member can hold even one layer")
    layers = shape.num_layers
    rooms = [_room(shape, m) for m in members]
    everyone = range(len(members))

    def reachable(limit: float) -> bool:
        return (
            _ends(shape, members, rooms, limit, everyone, False) is not None
            or _alone(shape, members, rooms, limit) is not None
        )

    # the bottleneck of any plan is a link time or c layers at some member's speed
    limits = sorted(
        {m.link_seconds for m in members} | {c * m.seconds_per_layer for m in members for c in range(1, layers + 1)}
    )
    best = _lowest(limits, reachable)
    if best is None:
        largest = max(members, key=lambda m: m.memory)
        raise PlacementError(
            f"the memory adds up but no split fits: the embeddings ({shape.first_bytes / 1e9:.1f} GB) or the head "
            f"({shape.last_bytes / 1e9:.1f} GB) with one layer need more than any member has free "
            f"(largest: {largest.name}, {largest.memory / 1e9:.1f} GB)"
        )
    ends = _ends(shape, members, rooms, best, everyone, False)
    if ends is None:  # no pipeline of two reaches the best time: one member alone does
        alone = _alone(shape, members, rooms, best)
        m = members[alone if alone is not None else 0]
        return Plan((m.name,), ((0, layers),), max(m.link_seconds, layers * m.seconds_per_layer))
    # every member that can take a layer within the best time takes part (at most one per layer)
    first, last = ends
    able = [
        i
        for i in everyone
        if i not in ends and _link_ok(members[i], best) and min(_by_time(shape, members[i], best), rooms[i].middle) >= 1
    ]
    able.sort(key=lambda i: (-min(_by_time(shape, members[i], best), rooms[i].middle), i))
    pool = sorted([first, last, *able[: layers - 2]])
    # then the slowest compute stage as fast as possible with all of them
    compute = sorted({c * members[i].seconds_per_layer for i in pool for c in range(1, layers + 1)} | {best})
    fastest = _lowest(
        [x for x in compute if x <= best], lambda x: _ends(shape, members, rooms, x, pool, True) is not None
    )
    chosen = _ends(shape, members, rooms, best if fastest is None else fastest, pool, True)
    first, last = chosen if chosen is not None else (first, last)
    order = [first, *(i for i in pool if i not in (first, last)), last]
    counts = _spread(shape, members, rooms, order)
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    step = max(max(members[i].link_seconds, c * members[i].seconds_per_layer) for i, c in zip(order, counts))
    return Plan(tuple(members[i].name for i in order), tuple(ranges), step)


# --------------------------------------------------------------------------- planner inputs


class Announced(Protocol):
    """What placement reads of a worker's announcement (``worker_core.wire.Hello``)."""

    @property
    def device(self) -> str: ...
    @property
    def free_memory(self) -> int: ...
    @property
    def gflops(self) -> float: ...
    @property
    def rtt_ms(self) -> float: ...
    @property
    def link_mbps(self) -> float: ...


def planner_members(hellos: Sequence[Announced], layer_params: int, hidden_size: int, itemsize: int) -> list[Member]:
    """Planner members (named by index) from what the workers announced.

    Times are for a reference step of ``REF_ROWS`` rows.  Compute per layer is
    ``2 * layer_params * REF_ROWS`` FLOPs at the member's measured GFLOP/s, where members whose
    speeds are within a factor of two of the group's median count as equal; a start-up burst
    on CPUs that several workers share measures the contention, not the machine, so speeds
    are used only when every member computes on its own GPU (else all run at the median).
    The link time is the announced round trip plus the step's activations in and out at the
    announced bandwidth (the master relays: both cross the member's link); unknown parts count
    zero.  Links are counted from the group's best and differences under ``LINK_NOISE`` are
    dropped.  When no member measured its speed, times are relative and links are left out."""
    on_gpus = all(h.device.startswith("cuda") for h in hellos)
    rel = relative_times([h.gflops for h in hellos]) if on_gpus else [1.0] * len(hellos)
    known = sorted(h.gflops for h in hellos if h.gflops > 0)
    if not known or layer_params <= 0:
        return [Member(str(i), h.free_memory, t) for i, (h, t) in enumerate(zip(hellos, rel))]
    base = 2 * layer_params * REF_ROWS / (known[len(known) // 2] * 1e9)  # seconds per layer at the median speed
    activations = 2 * REF_ROWS * hidden_size * itemsize * 8  # bits in and out
    links = [h.rtt_ms / 1000 + (activations / (h.link_mbps * 1e6) if h.link_mbps > 0 else 0.0) for h in hellos]
    best = min(links)
    # a time added to every stage changes no choice, so links count from the best one; a short
    # measurement on a busy machine is noisy, so a link within LINK_NOISE of the best counts as equal
    extra = [x - best if x - best > LINK_NOISE else 0.0 for x in links]
    return [Member(str(i), h.free_memory, t * base, x) for i, (h, t, x) in enumerate(zip(hellos, rel, extra))]


def relative_times(gflops: list[float]) -> list[float]:
    """Relative time per layer of each member from its measured speed.  A start-up burst is
    noisy (members often share a machine or warm up), so speeds within a factor of two of the
    group's median count as equal; only clearly faster or slower machines get more or fewer
    layers."""
    known = sorted(g for g in gflops if g > 0)
    if not known:
        return [1.0] * len(gflops)
    median = known[len(known) // 2]
    out = []
    for g in gflops:
        ratio = g / median if g > 0 else 1.0
        out.append(1.0 if 0.5 <= ratio <= 2.0 else 1.0 / ratio)
    return out
