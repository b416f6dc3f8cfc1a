"""The scheduler: who runs, in how many micro-batches, with how many prefill tokens.

Contract
--------
Pure: no I/O, no clock of its own, no torch.  The engine asks it, and executes the answer.

* :func:`microbatch_count` — **dynamic micro-batching**: how many micro-batches to keep in
  flight so that the bottleneck resource (a stage's compute or a link's bandwidth) never
  idles: the smallest K with ``K * bottleneck_time >= cycle_time`` for micro-batches of
  ``ceil(active / K)`` decode tokens, from measured costs (:mod:`master_core.costs`).
* :func:`chunk_tokens` — **chunk-based prefill transmission**: the prefill tokens one
  micro-batch may carry, chosen just in time so that the chunk's extra time on the slowest
  resource fits in the gap before the next decode micro-batch needs it (``cycle / K`` minus
  the decode work there).  It follows the measured bandwidth: slower links, smaller chunks.
* :func:`next_microbatch` — the engine's and the simulator's one call per micro-batch: its
  share of the decode steps (:func:`microbatch_share`), its prefill budget
  (:func:`chunk_tokens`), then :func:`plan_microbatch`.
* :func:`plan_microbatch` — one micro-batch: every ready decode step first (a decode step
  never waits behind more than one prefill chunk), then prefill, oldest first, within the
  chunk budget; prefill always gets at least ``min_chunk`` tokens when it waits, so neither
  side starves.  A long prompt may have several chunks in flight (they travel in order).
* :func:`step_bytes` — the byte model of one step on each stage's link (shared with the
  simulator).
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


@dataclass(frozen=True)
class Policy:
    name: str = "full"
    chunking: bool = True  # just-in-time prefill chunks; False: a whole prompt in one step
    dynamic: bool = True  # micro-batches in flight from measured costs; False: fixed
    fixed_microbatches: int | None = None  # with dynamic False: this many (None: one per stage)
    max_batch_tokens: int = 512  # hard cap on tokens in one step
    min_chunk: int = 16  # prefill tokens a micro-batch always may carry when prefill waits
    default_chunk: int = 128  # before any cost is measured
    max_microbatches: int = 16


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


# --------------------------------------------------------------------------- timing model


TOKEN_ID_BYTES = 8  # the first stage receives int64 token ids, not activations


def step_bytes(c: CostSnapshot, stage: int, tokens: int, logits_rows: int) -> tuple[int, int]:
    """(bytes into, bytes out of) ``stage`` for one step of ``tokens`` rows of which
    ``logits_rows`` want logits: token ids into the first stage, activations between stages,
    logits rows out of the last.  The one byte model of the scheduler and the simulator."""
    inbound = tokens * (TOKEN_ID_BYTES if stage == 0 else c.hidden_bytes_per_token)
    outbound = logits_rows * c.logits_bytes_per_row if stage == c.stages - 1 else tokens * c.hidden_bytes_per_token
    return inbound, outbound


def _resource_times(c: CostSnapshot, tokens: int, logits_rows: int) -> tuple[list[float], list[float]]:
    """Per stage: compute seconds and link-occupancy seconds of one step of ``tokens``."""
    compute = [c.stage_fixed[i] + c.stage_per_token[i] * tokens for i in range(c.stages)]
    link = []
    for i in range(c.stages):
        inbound, outbound = step_bytes(c, i, tokens, logits_rows)
        bw = c.link_bandwidth[i]
        link.append((inbound + outbound) / bw if math.isfinite(bw) and bw > 0 else 0.0)
    return compute, link


def cycle_time(c: CostSnapshot, tokens: int, logits_rows: int) -> tuple[float, float]:
    """(seconds for one micro-batch to go through the whole pipeline and back,
    seconds it occupies the busiest single resource)."""
    compute, link = _resource_times(c, tokens, logits_rows)
    cycle = sum(compute) + sum(link) + sum(c.link_rtt)
    return cycle, max(compute + link)


def microbatch_count(p: Policy, costs: CostSnapshot | None, stages: int, active: int) -> int:
    if not p.dynamic:
        return max(1, p.fixed_microbatches or stages)
    if costs is None or costs.stages != stages:
        return max(1, min(stages, max(1, active)))
    limit = max(1, min(p.max_microbatches, active))
    for k in range(1, limit + 1):
        b = math.ceil(max(1, active) / k)
        cycle, bottleneck = cycle_time(costs, b, b)
        if k * bottleneck >= cycle:
            return k
    return limit


def chunk_tokens(p: Policy, costs: CostSnapshot | None, decode_tokens: int, microbatches: int) -> int:
    """Prefill tokens the next micro-batch may carry (beside ``decode_tokens`` decode steps)."""
    room = max(0, p.max_batch_tokens - decode_tokens)
    if not p.chunking:
        return room
    if costs is None:
        return min(room, p.default_chunk)
    cycle, _ = cycle_time(costs, max(1, decode_tokens), max(1, decode_tokens))
    spacing = cycle / max(1, microbatches)  # the next decode micro-batch needs a resource this soon
    compute_d, link_d = _resource_times(costs, decode_tokens, decode_tokens)
    per_token = []
    for i in range(costs.stages):
        bw = costs.link_bandwidth[i]
        link_tok = (2 * costs.hidden_bytes_per_token) / bw if math.isfinite(bw) and bw > 0 else 0.0
        per_token.append((costs.stage_per_token[i], link_tok))
    best = room
    for i in range(costs.stages):
        for busy, per in ((compute_d[i], per_token[i][0]), (link_d[i], per_token[i][1])):
            if per > 0:
                best = min(best, int(max(0.0, spacing - busy) / per))
    return max(min(p.min_chunk, room), min(best, room))


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


def next_microbatch(p: Policy, costs: CostSnapshot | None, candidates: Sequence[Candidate], slots: int) -> list[Chunk]:
    """The next micro-batch of ``slots`` in flight over the running requests ``candidates``:
    its share of the ready decode steps, then prefill within :func:`chunk_tokens`.  The engine
    and the simulator both plan through this one function."""
    share = microbatch_share(len(candidates), slots)
    decodes = min(share, sum(1 for c in candidates if c.ready_decode))
    prefill = chunk_tokens(p, costs, decodes, slots)
    return plan_microbatch(candidates, max_decodes=decodes, prefill_tokens=prefill, min_chunk=p.min_chunk)


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
