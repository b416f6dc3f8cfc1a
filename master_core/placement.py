"""Place contiguous ranges of decoder layers on the members of a group.

Contract: pure.  ``kv_token_budget`` turns memory left after weights into a KV cache size
in tokens.  ``planner_members`` turns what the workers announced (memory offered, measured
speed, measured link) into planner planner members timed on a reference step.

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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

BISECTION_STEPS = 60  # halvings of the bottleneck-time interval: below float resolution of any start
TIME_SLACK = 1e-9  # seconds: rounding slack when a time limit is compared with layer counts or plans
LINK_SLACK = 1e-12  # seconds: rounding slack when a member's link time is compared with the limit
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


def _stage_bytes(shape: ModelShape, layers: int, first: bool, last: bool) -> int:
    return (
        layers * (shape.layer_bytes + shape.kv_bytes_per_layer)
        + (shape.first_bytes if first else 0)
        + (shape.last_bytes if last else 0)
    )


def _max_layers(shape: ModelShape, m: Member, limit: float, first: bool, last: bool) -> int:
    """Most layers ``m`` can take within time ``limit`` and its memory, at that position."""
    per = shape.layer_bytes + shape.kv_bytes_per_layer
    room = m.memory - (shape.first_bytes if first else 0) - (shape.last_bytes if last else 0)
    by_mem = room // per if room >= 0 else -1
    if m.link_seconds > limit + LINK_SLACK:
        return 0  # its link alone is slower than the limit: it cannot be a stage
    by_time = math.floor(limit / m.seconds_per_layer + TIME_SLACK) if m.seconds_per_layer > 0 else shape.num_layers
    return max(0, min(shape.num_layers, by_mem, by_time))


def _fits_order(shape: ModelShape, members: Sequence[Member], limit: float) -> list[int] | None:
    """Greedy: each member in turn takes as many layers as time ``limit`` and its memory
    allow (members may be left out); None when the layers do not all fit."""
    left = shape.num_layers
    counts: list[int] = []
    for m in members:
        first = not any(counts)
        if _max_layers(shape, m, limit, first, True) >= left:
            counts.append(left)  # it can finish the model: it is the last stage
            return counts + [0] * (len(members) - len(counts))
        take = min(_max_layers(shape, m, limit, first, False), left - 1)
        counts.append(take)
        left -= take
    return None


def _spread_over_all(shape: ModelShape, members: Sequence[Member], limit: float) -> list[int] | None:
    """Every member takes part (first is first, last is last): start from what each could take
    within ``limit`` and give back the surplus from the slowest stages; None if impossible."""
    n = len(members)
    caps = [_max_layers(shape, m, limit, i == 0, i == n - 1) for i, m in enumerate(members)]
    if min(caps) < 1 or sum(caps) < shape.num_layers or n > shape.num_layers:
        return None
    counts = list(caps)
    for _ in range(sum(caps) - shape.num_layers):
        i = max((i for i in range(n) if counts[i] > 1), key=lambda i: counts[i] * members[i].seconds_per_layer)
        counts[i] -= 1
    return counts


def _bottleneck(fill, shape: ModelShape, order: Sequence[Member]) -> tuple[float, list[int]] | None:
    """Smallest time limit under which ``fill`` places every layer, and its counts."""
    hi = max(max(m.link_seconds, shape.num_layers * m.seconds_per_layer) for m in order)
    if fill(shape, order, hi) is None:
        return None
    lo = 0.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if fill(shape, order, mid) is None:
            lo = mid
        else:
            hi = mid
    counts = fill(shape, order, hi)
    if counts is None:
        return None
    return max(max(m.link_seconds, c * m.seconds_per_layer) for m, c in zip(order, counts) if c > 0), counts


def plan_pipeline(shape: ModelShape, members: Sequence[Member], max_exhaustive: int = 7) -> Plan:
    """Choose the order and contiguous ranges that minimise the slowest stage's time
    (maximise throughput).  Orders are tried exhaustively up to ``max_exhaustive`` members,
    else fastest-first; for each order a binary search on the bottleneck time with a greedy
    fill.  Raises :class:`PlacementError` saying what is missing when nothing fits."""
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
    orders: Iterable[Sequence[Member]]
    if len(members) <= max_exhaustive:
        orders = itertools.permutations(members)
    else:
        orders = [sorted(members, key=lambda m: m.seconds_per_layer)]
    best: Plan | None = None
    for order in orders:
        # prefer every member taking part when that is as fast as leaving some out
        for fill in (_spread_over_all, _fits_order):
            found = _bottleneck(fill, shape, order)
            if found is None:
                continue
            step, counts = found
            if best is None or step < best.step_seconds - TIME_SLACK:
                used = [(m, c) for m, c in zip(order, counts) if c > 0]
                ranges, start = [], 0
                for _, c in used:
                    ranges.append((start, start + c))
                    start += c
                best = Plan(tuple(m.name for m, _ in used), tuple(ranges), step)
    if best is None:
        largest = max(members, key=lambda m: m.memory)
        raise PlacementError(
            f"the memory adds up but no split fits: the embeddings ({shape.first_bytes / 1e9:.1f} GB) or the head "
            f"({shape.last_bytes / 1e9:.1f} GB) with one layer need more than any member has free "
            f"(largest: {largest.name}, {largest.memory / 1e9:.1f} GB)"
        )
    return best


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
