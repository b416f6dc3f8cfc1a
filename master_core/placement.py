"""Place contiguous ranges of decoder layers on workers in proportion to what each can hold.

Contract: pure.  ``place_layers(num_layers, capacities)`` takes each worker's usable memory
(bytes, in pipeline order) and returns one ``(start, end)`` range per worker used, covering
``[0, num_layers)`` in order, every range non-empty, sizes proportional to capacity (largest
remainder rounding).  With more workers than layers only the largest ``num_layers`` take part;
the result then lists ``None`` for the others.  ``kv_token_budget`` turns memory left after
weights into a KV cache size in tokens.
"""

from __future__ import annotations

from typing import Sequence


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
