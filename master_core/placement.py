"""Place contiguous ranges of decoder layers on workers in proportion to what each can hold.

Contract: pure.  ``place_layers(num_layers, capacities)`` takes each worker's usable memory
(bytes, in pipeline order) and returns one ``(start, end)`` range per worker used, covering
``[0, num_layers)`` in order, every range non-empty, sizes proportional to capacity (largest
remainder rounding).  With more workers than layers only the largest ``num_layers`` take part;
the result then lists ``None`` for the others.  ``kv_token_budget`` turns memory left after
weights into a KV cache size in tokens.

``plan_pipeline(shape, members)`` is the planner for unequal machines: given each member's
memory, measured speed and link, it picks the pipeline order and contiguous ranges that
minimise the slowest stage (so maximise throughput), honouring every member's memory
(weights, embeddings on the first stage, head on the last, a KV reserve per layer), or
raises :class:`PlacementError` saying what is missing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence


class PlacementError(ValueError):
    """The group cannot hold the model."""


def place_layers(num_layers: int, capacities: Sequence[int]) -> list[tuple[int, int] | None]:
    if num_layers < 1:
        raise PlacementError("a model needs at least one layer")
    if not capacities:
        raise PlacementError("no workers to place layers on")
    if any(c <= 0 for c in capacities):
        raise PlacementError("every worker must report positive memory")
    order = sorted(range(len(capacities)), key=lambda i: -capacities[i])
    used = sorted(order[:num_layers])
    total = sum(capacities[i] for i in used)
    shares = {i: num_layers * capacities[i] / total for i in used}
    counts = {i: max(1, int(shares[i])) for i in used}
    while sum(counts.values()) > num_layers:  # too many after the minimum of one each
        i = max((i for i in used if counts[i] > 1), key=lambda i: counts[i] - shares[i])
        counts[i] -= 1
    while sum(counts.values()) < num_layers:  # largest remainder first
        i = max(used, key=lambda i: shares[i] - counts[i])
        counts[i] += 1
    out: list[tuple[int, int] | None] = [None] * len(capacities)
    start = 0
    for i in used:
        out[i] = (start, start + counts[i])
        start += counts[i]
    return out


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
    return layers * (shape.layer_bytes + shape.kv_bytes_per_layer) + (shape.first_bytes if first else 0) + (shape.last_bytes if last else 0)


def _fits_order(shape: ModelShape, members: Sequence[Member], limit: float) -> list[int] | None:
    """Greedy: each member in turn takes as many layers as time ``limit`` and its memory
    allow; None when the layers do not all fit."""
    left = shape.num_layers
    counts: list[int] = []
    for i, m in enumerate(members):
        last_possible = i == len(members) - 1
        best = 0
        for n in range(left, 0, -1):
            is_last = n == left
            if m.link_seconds + n * m.seconds_per_layer > limit + 1e-12:
                continue
            if _stage_bytes(shape, n, not counts or all(c == 0 for c in counts), is_last) <= m.memory:
                best = n
                break
        counts.append(best)
        left -= best
        if left == 0:
            return counts + [0] * (len(members) - len(counts))
        if last_possible:
            return None
    return None


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
        hi = max(m.link_seconds + shape.num_layers * m.seconds_per_layer for m in order)
        if _fits_order(shape, order, hi) is None:
            continue
        lo = 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if _fits_order(shape, order, mid) is None:
                lo = mid
            else:
                hi = mid
        counts = _fits_order(shape, order, hi)
        if counts is None:  # cannot happen: hi stays feasible; skip the order rather than crash
            continue
        used = [(m, c) for m, c in zip(order, counts) if c > 0]
        ranges, start = [], 0
        for _, c in used:
            ranges.append((start, start + c))
            start += c
        step = max(m.link_seconds + c * m.seconds_per_layer for m, c in used)
        if best is None or step < best.step_seconds - 1e-12:
            best = Plan(tuple(m.name for m, _ in used), tuple(ranges), step)
    if best is None:
        largest = max(members, key=lambda m: m.memory)
        raise PlacementError(
            f"the memory adds up but no split fits: the embeddings ({shape.first_bytes / 1e9:.1f} GB) or the head "
            f"({shape.last_bytes / 1e9:.1f} GB) with one layer need more than any member has free (largest: {largest.name}, "
            f"{largest.memory / 1e9:.1f} GB)"
        )
    return best
