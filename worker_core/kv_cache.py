"""Per-request KV caches of one stage, and the packed view a mixed micro-batch attends through.

Contract
--------
* :class:`KVStore` owns, for every live request, one key and one value buffer per local layer
  (``[kv_heads, capacity, head_dim]``, grown by doubling).  It knows the committed length of
  each request and the total number of cached tokens, which never exceeds ``budget_tokens``.
  A request may start from a cached prefix: the first tokens of another request's cache (the
  master's prefix cache decides which, :mod:`master_core.prefix_cache`), shared, not copied,
  counted once (for the cache that holds it), and never written again (``shared_upto``).
* :class:`PackedCache` is built for one step.  The step's tokens of all its segments are
  packed into one sequence of T tokens (batch size 1); transformers' attention modules call
  :meth:`PackedCache.update` once per layer with the new keys/values ``[1, kv_heads, T, d]``.
  It appends each segment's slice to its request's buffers and returns the keys/values of all
  segments' requests, concatenated in segment order: ``[1, kv_heads, sum(L_i), d]`` with
  ``L_i = start_i + length_i``.  :func:`packed_mask` gives the matching block-diagonal causal
  mask, so no token ever sees another request's keys.  Split (CPU stages whose layers attend
  to the keys as cached, :mod:`worker_core.segment_attention`), it joins nothing: each
  segment's keys and values are attended where they are.
* Lengths are committed only by :meth:`PackedCache.commit` after every layer ran, so a step
  that fails midway leaves the committed state as it was (its partial writes lie beyond the
  committed lengths and are overwritten next time).
* A stage that is not the last also keeps, per request, the hidden states it sent on (its
  *tape*, ``RequestKV.keep`` / :meth:`RequestKV.rows`, one row per position, in host memory;
  on a CPU stage that is the KV's memory, and the master counts it in the KV budget): if the
  next stage is lost, the master recalls them (``wire.Recall``) to rebuild that stage's KV
  without computing this one or any before it again.  A prefix shared from ``base`` shares its
  tape rows as well.  Tapes are keyed by the layer end the rows leave: a standby member's
  whole model keeps one at each stage end of the serving pipeline, and :meth:`KVStore.narrowed`
  hands the layers and the tape of one range to the stage it becomes.
* Knows nothing about models, the network or the master.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RequestKV:
    """KV buffers of one request on this stage: its own positions ``[base_len, length)``, and
    before them, when it started from a cached prefix, the first ``base_len`` positions of
    ``base`` (shared, read only: ``base`` never writes below ``shared_upto`` again)."""

    length: int = 0  # committed tokens, the shared prefix included
    generation: int = 0  # of its KV id (wire.Segment.generation)
    base: RequestKV | None = None
    base_len: int = 0
    shared_upto: int = 0  # its leading tokens other requests use as their prefix
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [kv_heads, cap, d], from base_len on
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    tapes: dict[int, torch.Tensor] = field(default_factory=dict)  # layer end -> [cap, hidden], from base_len on

    def keep(self, start: int, rows: torch.Tensor, at: int) -> None:
        """Keep the rows ``[start, start + n)`` leaving layer end ``at`` (``rows``: [n, hidden];
        start >= base_len)."""
        local = start - self.base_len
        end = local + rows.shape[0]
        tape = self.tapes.get(at)
        if tape is None or tape.shape[0] < end or tape.shape[1] != rows.shape[1]:
            grown = rows.new_empty((max(16, end, 2 * (tape.shape[0] if tape is not None else 0)), rows.shape[1]))
            if tape is not None and local and tape.shape[1] == rows.shape[1]:
                grown[:local] = tape[:local]
            tape = self.tapes[at] = grown
        tape[local:end] = rows

    def rows(self, start: int, end: int, at: int) -> torch.Tensor | None:
        """The kept rows of positions ``[start, end)`` (end <= committed length) leaving layer end
        ``at``, or None where any of them was never kept."""
        if end <= start:
            return None
        parts = []
        if start < self.base_len:
            if self.base is None:
                return None
            below = self.base.rows(start, min(end, self.base_len), at)
            if below is None:
                return None
            parts.append(below)
            start = self.base_len
        if start < end:
            tape = self.tapes.get(at)
            if tape is None or end - self.base_len > tape.shape[0]:
                return None
            parts.append(tape[start - self.base_len : end - self.base_len])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def own(self) -> int:
        """Tokens it holds itself (counted in the budget; the shared prefix is its base's)."""
        return max(0, self.length - self.base_len)

    def prefix(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, n) (n <= committed length): [kv_heads, n, d].  A
        chain of prefixes (a conversation's turns, each starting from the one before) is joined
        in one copy, whatever its depth."""
        ks, vs = self.pieces(layer, n)
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def pieces(self, layer: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The slices of positions [0, n) along the chain of bases, in position order (views, no copy)."""
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        r: RequestKV | None = self
        while r is not None:
            below = r.base_len if r.base is not None else 0
            if n > below:
                ks.append(r.keys[layer][:, : n - below])
                vs.append(r.values[layer][:, : n - below])
                n = below
            if not n:
                break
            r = r.base
        ks.reverse()
        vs.reverse()
        return ks, vs

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([kv_heads, n, d]) at positions [start, start+n) (start >= base_len); return
        the keys and values of positions [0, start+n)."""
        kb, vb, end = self.store(layer, start, k, v)
        if self.base is None or not self.base_len:
            return kb[:, :end], vb[:, :end]
        return self.prefix(layer, start + k.shape[1])

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Write k, v at positions [start, start+n) (start >= base_len): (its own key and value
        buffers of the layer, the end of the write in them)."""
        local = start - self.base_len  # index in its own buffers
        end = local + k.shape[1]
        old_k, old_v = self.keys.get(layer), self.values.get(layer)  # both or neither
        if old_k is None or old_v is None or old_k.shape[1] < end:
            cap = max(16, end, 2 * (old_k.shape[1] if old_k is not None else 0))
            kb = k.new_empty((k.shape[0], cap, k.shape[2]))
            vb = v.new_empty((v.shape[0], cap, v.shape[2]))
            if old_k is not None and old_v is not None and local:
                kb[:, :local] = old_k[:, :local]
                vb[:, :local] = old_v[:, :local]
            self.keys[layer], self.values[layer] = kb, vb
        else:
            kb, vb = old_k, old_v
        kb[:, local:end] = k
        vb[:, local:end] = v
        return kb, vb, end


class KVStore:
    """All requests' caches on one stage, within a token budget (a shared prefix counts once:
    for the cache that holds it)."""

    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self._requests: dict[int, RequestKV] = {}

    def length(self, request_id: int) -> int:
        r = self._requests.get(request_id)
        return r.length if r is not None else 0

    def get(self, request_id: int) -> RequestKV | None:
        return self._requests.get(request_id)

    @property
    def used_tokens(self) -> int:
        return sum(r.own for r in self._requests.values())

    def __len__(self) -> int:
        return len(self._requests)

    def items(self) -> list[tuple[int, RequestKV]]:
        return list(self._requests.items())

    def get_or_create(self, request_id: int) -> RequestKV:
        r = self._requests.get(request_id)
        if r is None:
            r = self._requests[request_id] = RequestKV()
        return r

    def start(self, request_id: int, generation: int, base: int = 0, base_len: int = 0) -> RequestKV:
        """A new cache for ``request_id`` (replacing any it had) of ``generation``; with ``base``
        its first ``base_len`` tokens are that cache's (which keeps them unwritten from now on)."""
        prefix = self._requests[base] if base else None
        if prefix is not None:
            prefix.shared_upto = max(prefix.shared_upto, base_len)
        r = self._requests[request_id] = RequestKV(
            length=base_len if prefix else 0, generation=generation, base=prefix, base_len=base_len if prefix else 0
        )
        return r

    def free(self, request_ids: tuple[int, ...] | list[int]) -> None:
        for rid in request_ids:
            self._requests.pop(rid, None)

    def narrowed(self, start: int, end: int, budget_tokens: int) -> KVStore:
        """The caches of layers ``[start, end)`` as a store of ``budget_tokens`` for a stage of that
        range (a standby member taking over a lost stage): each request's keys and values of those
        layers and the rows it kept leaving layer ``end``, nothing copied; the rest is dropped.
        Caches that start from a cached prefix keep starting from it (it is carried too)."""
        store = KVStore(budget_tokens)
        for rid, r in self._requests.items():
            r.keys = {i: k for i, k in r.keys.items() if start <= i < end}
            r.values = {i: v for i, v in r.values.items() if start <= i < end}
            r.tapes = {at: t for at, t in r.tapes.items() if at == end}
            store._requests[rid] = r
        self._requests = {}
        return store


@dataclass(frozen=True)
class PackedSegment:
    request: RequestKV
    start: int  # position of the first new token
    offset: int  # index of the first new token in the packed sequence
    length: int


class PackedCache:
    """The cache object handed to transformers' layers for one packed step."""

    def __init__(self, segments: list[PackedSegment], unjoined: bool = False) -> None:
        self.segments = segments
        # unjoined (:mod:`worker_core.segment_attention`): ``update`` joins nothing; it keeps each
        # segment's keys and values in ``current`` (per segment the pieces of its chain of cached
        # prefixes, in position order: views), beside the layer and the keys it returned
        self.unjoined = unjoined
        self.current: tuple[int, list[tuple[list[torch.Tensor], list[torch.Tensor]]], torch.Tensor | None] = (
            -1,
            [],
            None,
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, kv_heads, T, d]
        if self.unjoined:
            pieces = []
            for s in self.segments:
                rows = slice(s.offset, s.offset + s.length)
                s.request.store(layer_idx, s.start, key_states[0, :, rows], value_states[0, :, rows])
                pieces.append(s.request.pieces(layer_idx, s.start + s.length))
            self.current = (layer_idx, pieces, key_states)
            return key_states, value_states
        ks, vs = [], []
        for s in self.segments:
            k, v = s.request.write(
                layer_idx,
                s.start,
                key_states[0, :, s.offset : s.offset + s.length],
                value_states[0, :, s.offset : s.offset + s.length],
            )
            ks.append(k)
            vs.append(v)
        if len(ks) == 1:
            return ks[0].unsqueeze(0), vs[0].unsqueeze(0)
        return torch.cat(ks, dim=1).unsqueeze(0), torch.cat(vs, dim=1).unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:  # for code that asks; packed: total keys
        return sum(s.start + s.length for s in self.segments)

    def commit(self) -> None:
        for s in self.segments:
            s.request.length = s.start + s.length


def packed_mask(
    starts: list[int], lengths: list[int], window: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive attention mask [1, 1, T, sum(start+length)] for a packed step: token j of
    segment i (position starts[i]+j) sees positions 0..starts[i]+j of its own request only,
    and with a sliding ``window`` only the last ``window`` of those (itself included)."""
    total_q = sum(lengths)
    total_k = sum(s + n for s, n in zip(starts, lengths))
    mask = torch.full((total_q, total_k), torch.finfo(dtype).min, dtype=dtype, device=device)
    q0 = k0 = 0
    for s, n in zip(starts, lengths):
        qpos = torch.arange(s, s + n, device=device).unsqueeze(1)
        kpos = torch.arange(s + n, device=device).unsqueeze(0)
        allowed = kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        mask[q0 : q0 + n, k0 : k0 + s + n].masked_fill_(allowed, 0.0)
        q0 += n
        k0 += s + n
    return mask.view(1, 1, total_q, total_k)
