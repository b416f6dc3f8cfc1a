"""Plan the next micro-batch: which requests run, and how many of their tokens.

Contract: pure (no I/O, no clock, no torch).  ``plan_microbatch(candidates, ...)`` looks at
requests that are running and not in flight and returns the chunks of one micro-batch:

* decode steps first (a request with exactly one uncomputed token), oldest first, so that
  generation is never starved by long prompts;
* then prefill chunks, oldest first, each as long as the remaining token budget allows
  (chunked prefill: a long prompt is spread over several steps);
* at most ``max_requests`` requests and ``token_budget`` tokens in total.

``microbatch_share(active, in_flight_slots)`` is how many requests one micro-batch takes so
that ``slots`` micro-batches in flight share the running requests evenly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Candidate:
    request_id: int
    computed: int  # tokens whose KV every stage holds
    total: int  # prompt + generated tokens
    order: int  # admission order, smaller is older


@dataclass(frozen=True)
class Chunk:
    request_id: int
    start: int  # first position of this chunk
    length: int
    want_logits: bool  # the chunk reaches the end of the request's tokens: sample after it


def plan_microbatch(candidates: Sequence[Candidate], *, token_budget: int, max_requests: int) -> list[Chunk]:
    if token_budget <= 0 or max_requests <= 0:
        return []
    decodes = sorted((c for c in candidates if c.total - c.computed == 1), key=lambda c: c.order)
    prefills = sorted((c for c in candidates if c.total - c.computed > 1), key=lambda c: c.order)
    chunks: list[Chunk] = []
    budget = token_budget
    for c in decodes:
        if len(chunks) == max_requests or budget == 0:
            return chunks
        chunks.append(Chunk(c.request_id, c.computed, 1, True))
        budget -= 1
    for c in prefills:
        if len(chunks) == max_requests or budget == 0:
            break
        n = min(c.total - c.computed, budget)
        chunks.append(Chunk(c.request_id, c.computed, n, c.computed + n == c.total))
        budget -= n
    return chunks


def microbatch_share(active: int, slots: int) -> int:
    """Requests per micro-batch so that ``slots`` micro-batches split ``active`` requests."""
    return max(1, math.ceil(active / max(1, slots)))
