"""Run steps of one pipeline stage: a packed micro-batch in, hidden states or logits out.

Contract
--------
``StageRunner(shard, kv_tokens, max_batch_tokens).run(segments, tensor)`` executes one step.
The step packs segments of different requests (prefill chunks and single decode tokens,
each at its own positions) into one sequence and runs one forward over the stage's layers,
each request attending only to its own KV cache (see :mod:`worker_core.kv_cache`).

* input: token ids ``[T] int64`` on the first stage, hidden states ``[T, hidden]`` elsewhere.
* output: hidden states ``[T, hidden]``, or on the last stage float32 logits
  ``[rows wanted, vocab]`` (the last ``Segment.logit_rows`` tokens of each segment), or with
  ``topk`` = k only the packed top-k rows ``[n, 1 + 2k]`` (see ``wire.Result``).

A segment starting at 0, or from a cached prefix (``Segment.base``: the first ``start``
tokens of another cache here, shared), replaces any old cache of its id and starts the
generation it names (never an older one than the stage holds).  Any other segment must
start within its cache (``0 < start <= cached``: truncate there, then write; never below a
prefix other requests share) and name the generation the stage holds or a newer one (which
it then holds): the master moves a KV id to a newer generation when it gives up on steps in
flight, so a late step of a journey it gave up on is refused, never written.  Checks run before any state changes; a
rejected step raises :class:`StepRejected` and leaves all caches as they were.  ``free`` drops
requests' caches (``run``'s ``drop`` first, before the checks).  Not thread-safe: one caller
runs steps in order.

``begin`` checks and sets up a step without running it; its :class:`StepRun` then runs a few
layers per ``advance``, and other steps may run between them (:mod:`worker_core.interleave`):
not on its requests (refused while it is open), and with its tokens counted in the budget.
Its lengths are committed after its last layer, so a step abandoned (``close``) commits nothing.

Every stage but the last keeps the rows it sends on (:mod:`worker_core.kv_cache`'s tape);
``recall`` gives them back for a rebuild of the next stage.  A stage widened over a lost
neighbour's layers (``missing``: those layers, its caches ``kv`` carried from its own range)
holds none of their positions at first: ``fill`` computes them for each request, in order,
from the rows it kept leaving them or from the input given (a newer generation of the KV id
is taken on, as a step's is); a step of such a request starting beyond the positions filled,
or a recall beyond them, is refused, and one starting within them cuts every layer back there.
A standby member's whole model also keeps the rows leaving each layer end in ``tapes`` (the
serving pipeline's stage ends), so the range it may take over later (``kv``: its caches
narrowed, :meth:`KVStore.narrowed`) has them too.

A stage that keeps a copy of the next stage's layers (``serve_end`` inside the loaded ``shard``:
it serves ``[shard.layer_start, serve_end)``, and ``copy`` is ``[serve_end, shard.layer_end)``)
computes its steps over the layers it serves only; ``fill`` computes the copy's keys and values
in the background, from the rows its steps kept leaving ``serve_end``, at any start within what
the copy holds (a step that writes below that cuts the copy back there).  ``take_copy`` then
serves every loaded layer, as a stage widened over its lost neighbour whose caches are filled as
far as the copy got: only the rest is missing.  The second stage may also keep a copy of the
first stage's layers (``serve_start``: the loaded shard starts the model, and ``first`` is
``[0, serve_start)``), filled the same way from the token ids (``first_held``), taken over by
``take_first``.  ``reshape`` makes the runner the stage an ``Assign`` asks for where its copies
allow it (one taken over, or dropped), its caches kept.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from .kv_cache import KVStore, PackedCache, PackedSegment, packed_mask
from .segment_attention import SEGMENTS, keys_as_cached, running
from .shard import Shard, cache_index, carve
from .wire import Segment


class StepRejected(Exception):
    """The step does not fit this stage's state (unknown position, budget, shape)."""


class StageRunner:
    def __init__(
        self,
        shard: Shard,
        kv_tokens: int,
        max_batch_tokens: int,
        tapes: tuple[int, ...] = (),
        kv: KVStore | None = None,
        missing: tuple[int, int] | None = None,
        serve_end: int | None = None,
        serve_start: int = 0,
    ) -> None:
        self.loaded = shard  # every layer loaded; ``shard`` the ones served
        low = serve_start if shard.layer_start == 0 < serve_start < shard.layer_end else shard.layer_start
        copying = serve_end is not None and low < serve_end < shard.layer_end
        high = serve_end if copying and serve_end else shard.layer_end
        self.shard = carve(shard, low, high) if (low, high) != (shard.layer_start, shard.layer_end) else shard
        # the next stage's layers, kept loaded with their caches filled in the background, or None
        self.copy = carve(shard, high, shard.layer_end) if copying else None
        # the first stage's layers, kept as a copy the same way (from the token ids), or None; and
        # per request, the positions of them held (a request not named holds its cached prefix's length)
        self.first = carve(shard, 0, low) if low > shard.layer_start else None
        self.first_held: dict[int, int] = {}
        self.kv = KVStore(kv_tokens) if kv is None else kv  # ``kv``: carried caches (a standby's, narrowed)
        self.kv.budget_tokens = kv_tokens
        # layers of the range that the carried caches lack (taken over from a lost neighbour, or
        # the copy), and per request whose positions of them are not all computed yet, how many
        # are (``fill``; a copy's request not named holds its cached prefix's length)
        self.unfilled = {rid: r.base_len for rid, r in self.kv.items()} if missing is not None else {}
        self.missing = missing if self.unfilled else None
        if self.copy is not None:
            self.missing = (self.copy.layer_start, self.copy.layer_end)
        self.keep_tapes(tapes)
        self.max_batch_tokens = max_batch_tokens
        self.last_compute_seconds = 0.0  # of the last step ``run`` ran whole
        self.progress = 0  # compute calls (StepRun.advance) finished: read by the tunnel's pongs
        self.computing = False  # one runs now
        self._open: list[StepRun] = []  # steps begun and not finished (StepRun)
        if shard.keys_as_cached is None and getattr(shard.config, "_attn_implementation", None) == SEGMENTS:
            shard.keys_as_cached = keys_as_cached(self._probe)
        for part in (self.shard, self.copy, self.first):  # (carved before the probe)
            if part is not None:
                part.keys_as_cached = shard.keys_as_cached

    def keep_tapes(self, tapes: tuple[int, ...]) -> None:
        """Keep the rows leaving these layer ends inside the range too (a standby's: Assign.tapes)."""
        self.tapes = frozenset(t for t in tapes if self.shard.layer_start < t < self.shard.layer_end)

    def copy_held(self, request_id: int) -> int:
        """Positions of ``request_id`` the copy (or the missing layers) holds: as counted, else
        none of its own (a copy's) or all (a widened stage's)."""
        r = self.kv.get(request_id)
        if r is None:
            return 0
        if request_id in self.unfilled:
            return self.unfilled[request_id]
        return r.base_len if self.copy is not None else r.length

    def held_first(self, request_id: int) -> int:
        """Positions of ``request_id`` the copy of the first stage's layers holds."""
        r = self.kv.get(request_id)
        return 0 if r is None else self.first_held.get(request_id, r.base_len)

    def serves(self, start: int, end: int, copy_end: int, copy_first: bool) -> bool:
        """Whether this runner is the stage of ``Assign`` fields like these."""
        copied = self.copy.layer_end if self.copy is not None else 0
        return (self.shard.layer_start, self.shard.layer_end, copied) == (start, end, copy_end) and (
            self.first is not None
        ) == copy_first

    def copying(self, start: int, end: int) -> bool:
        """Whether layers ``[start, end)`` are a copy's (their fills are background work)."""
        return any(p is not None and (p.layer_start, p.layer_end) == (start, end) for p in (self.copy, self.first))

    def reshape(self, start: int, end: int, copy_end: int, copy_first: bool) -> bool:
        """Become the stage of ``Assign`` fields like these from the layers loaded here, the caches
        kept: a copy's layers taken over where the range grows over them (their stage was lost),
        a copy not asked for dropped.  True when it then :meth:`serves` them; False (nothing
        taken over) when the range is not this stage's or one of its copies' joined to it."""
        if self.first is not None and (start, end) == (0, self.shard.layer_end):
            self.take_first()
        elif self.copy is not None and (start, end) == (self.shard.layer_start, self.copy.layer_end):
            self.take_copy()
        if (start, end) != (self.shard.layer_start, self.shard.layer_end):
            return False
        if not copy_first:
            self.drop_first()
        if not copy_end:
            self.drop_copy()
        return self.serves(start, end, copy_end, copy_first)

    def _forget(self, part: Shard) -> None:
        """Free every request's caches of ``part``'s layers."""
        gone = {cache_index(layer) for layer in part.layers}
        for _, r in self.kv.items():
            r.keys = {i: k for i, k in r.keys.items() if i not in gone}
            r.values = {i: v for i, v in r.values.items() if i not in gone}

    def drop_copy(self) -> None:
        """Keep serving the same layers without the copy of the next stage's: its caches are
        freed, its layers no longer this runner's."""
        if self.copy is None:
            return
        self._forget(self.copy)
        for _, r in self.kv.items():
            r.tapes.pop(self.copy.layer_end, None)
        self.loaded = carve(self.loaded, self.loaded.layer_start, self.shard.layer_end)
        self.copy, self.missing, self.unfilled = None, None, {}

    def drop_first(self) -> None:
        """Keep serving the same layers without the copy of the first stage's (as ``drop_copy``)."""
        if self.first is None:
            return
        self._forget(self.first)
        self.loaded = carve(self.loaded, self.shard.layer_start, self.loaded.layer_end)
        self.first, self.first_held = None, {}

    def take_copy(self) -> None:
        """Serve every loaded layer (the next stage was lost; a copy of the first stage's is
        dropped): the copy's layers are then missing for the positions it did not reach, as for a
        stage widened over them (``fill``)."""
        if self.copy is None:
            return
        self.drop_first()
        self.unfilled = {rid: held for rid, r in self.kv.items() if (held := self.copy_held(rid)) < r.length}
        self.shard, self.copy = self.loaded, None  # (``missing`` stays the copy's layers: see ``_filled``)

    def take_first(self) -> None:
        """Serve the first stage's layers too (it was lost; a copy of the next stage's is dropped),
        as ``take_copy`` does the next stage's."""
        if self.first is None:
            return
        self.drop_copy()
        self.unfilled = {rid: held for rid, r in self.kv.items() if (held := self.held_first(rid)) < r.length}
        self.missing = (0, self.first.layer_end)  # (until no request lacks them and a step or fill comes)
        self.shard, self.first, self.first_held = self.loaded, None, {}

    @torch.inference_mode()
    def _probe(self) -> None:
        """A packed step of two segments (two rows and one) on an unjoined cache and scratch buffers
        (see :func:`~worker_core.segment_attention.keys_as_cached`)."""
        sh = self.shard
        x = torch.zeros(3, dtype=torch.int64) if sh.is_first else torch.zeros(3, sh.hidden_size)
        scratch = KVStore(3)
        step = StepRun(self, (Segment(1, 0, 2, False), Segment(2, 0, 1, False)), x, 0, 0, scratch, unjoined=True)
        step.advance(len(sh.layers))

    # ----------------------------------------------------------------- checks
    @staticmethod
    def _check_input(sh: Shard, tensor: torch.Tensor, total: int) -> None:
        """``tensor`` is the input of ``total`` positions to the layers of ``sh``."""
        if sh.is_first:
            if tensor.dtype != torch.int64 or tensor.dim() != 1 or tensor.shape[0] != total:
                raise StepRejected(
                    f"first stage expects token ids [{total}] int64, got {list(tensor.shape)} {tensor.dtype}"
                )
            if total and (int(tensor.min()) < 0 or int(tensor.max()) >= sh.vocab_size):
                raise StepRejected("token id outside the vocabulary")
        else:
            if not tensor.is_floating_point() or tensor.dim() != 2 or tuple(tensor.shape) != (total, sh.hidden_size):
                raise StepRejected(
                    f"expects hidden states [{total}, {sh.hidden_size}], got {list(tensor.shape)} {tensor.dtype}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise StepRejected("hidden states contain NaN or infinity")

    def _check(self, segments: tuple[Segment, ...], tensor: torch.Tensor) -> int:
        total = sum(s.length for s in segments)
        if total > self.max_batch_tokens:
            raise StepRejected(f"step of {total} tokens exceeds max_batch_tokens={self.max_batch_tokens}")
        self._check_input(self.shard, tensor, total)
        added = 0
        ids = {s.request_id for s in segments}
        for s in segments if self.unfilled and self.copy is None else ():  # (a widened stage's, until filled)
            short = s.request_id in self.unfilled and 0 < s.start > self.unfilled[s.request_id] and not s.base
            if (s.base and self.unfilled.get(s.base, s.start) < s.start) or short:
                missing = self.missing or (0, 0)
                raise StepRejected(
                    f"request {s.request_id}: layers [{missing[0]}, {missing[1]}) of its cache are not computed yet"
                )
        for step in self._open:
            if busy := ids & step.ids:
                raise StepRejected(f"request {min(busy)} is being computed by another step")
        for s in segments:
            r = self.kv.get(s.request_id)
            name = f"request {s.request_id}"
            if s.base or s.start == 0:  # a new cache (from a cached prefix, or from nothing)
                if r is not None and s.generation < r.generation:
                    raise StepRejected(
                        f"{name}: a late step of generation {s.generation} (this stage holds {r.generation})"
                    )
                if s.base:
                    b = self.kv.get(s.base)
                    if b is None or b.length < s.start or s.base in ids:
                        held = "nothing" if b is None else f"{b.length} tokens"
                        raise StepRejected(
                            f"{name}: its cached prefix {s.base} ({s.start} tokens) is not here ({held})"
                        )
                added += s.length - (r.own if r is not None else 0)
                continue
            have = r.length if r is not None else 0
            if r is None or s.start > have:
                raise StepRejected(f"{name}: step starts at {s.start} but this stage holds {have} tokens")
            if s.generation < r.generation:
                raise StepRejected(
                    f"{name}: a late step of generation {s.generation} (this stage holds {r.generation})"
                )
            if s.start < max(r.base_len, r.shared_upto):
                raise StepRejected(f"{name}: step at {s.start} would write over a prefix other requests share")
            added += s.start + s.length - r.base_len - r.own  # from a start below its length: truncate, then write
        in_use = self.kv.used_tokens + sum(step.added for step in self._open)  # open steps' tokens count
        if in_use + added > self.kv.budget_tokens:
            budget = self.kv.budget_tokens
            raise StepRejected(f"KV budget of {budget} tokens exceeded (in use {in_use}, step adds {added})")
        return added

    # ----------------------------------------------------------------- the step
    def run(
        self, segments: tuple[Segment, ...], tensor: torch.Tensor, topk: int = 0, drop: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """One step, whole: its output (see the module docstring)."""
        step = self.begin(segments, tensor, topk, drop)
        step.advance(len(self.shard.layers))
        self.last_compute_seconds = step.seconds
        assert step.result is not None
        return step.result

    @torch.inference_mode()
    def begin(
        self, segments: tuple[Segment, ...], tensor: torch.Tensor, topk: int = 0, drop: tuple[int, ...] = ()
    ) -> StepRun:
        """Drops, checks and sets up one step; :meth:`StepRun.advance` then runs its layers.  While
        it is open (begun, not finished or closed), other steps may run, except on its requests
        (refused), and its tokens count in the KV budget."""
        t0 = time.perf_counter()
        if drop:
            self.free(drop)
        added = self._check(segments, tensor)
        for s in segments:
            if self.first is not None:  # (as the next stage's copy)
                self.first_held[s.request_id] = s.start if s.base else min(self.held_first(s.request_id), s.start)
            if self.copy is not None:  # what it writes below the copy's end is copied again
                self.unfilled[s.request_id] = s.start if s.base else min(self.copy_held(s.request_id), s.start)
            else:
                self._filled(s.request_id)  # a new cache, or one cut back to where every layer holds it
            if s.start == 0 or s.base:
                self.kv.start(s.request_id, s.generation, s.base, s.start)
            else:  # a newer generation from a start within the cache: steps of older ones are late from now on
                self.kv.get_or_create(s.request_id).generation = s.generation
        step = StepRun(self, segments, tensor, topk, added)
        step.seconds += time.perf_counter() - t0
        self._open.append(step)
        return step

    def free(self, request_ids: tuple[int, ...] | list[int]) -> None:
        self.kv.free(request_ids)
        for rid in request_ids:
            self._filled(rid)
            self.first_held.pop(rid, None)

    def _filled(self, request_id: int) -> None:
        """``request_id`` lacks none of the missing layers' positions now (or is gone); once no
        request does, nothing is missing, and rows kept leaving the old end are let go.  (Layers
        taken over from a copy stay missing until then even where the copy held every position:
        the master, whose count of a copy may trail the worker's, fills them again.)"""
        self.unfilled.pop(request_id, None)
        if self.unfilled or self.missing is None or self.copy:
            return
        start, self.missing = self.missing[0], None
        if start != self.shard.layer_start and start not in self.tapes:  # the old end, inside the range now
            for _, r in self.kv.items():
                r.tapes.pop(start, None)

    @torch.inference_mode()
    def fill(self, segments: tuple[Segment, ...], tensor: torch.Tensor, start: int, end: int) -> float:
        """Compute layers ``[start, end)`` (``missing``, or a copy's) of each segment's positions,
        which the stage's other layers hold already, from ``tensor`` (token ids where ``start``
        is 0, else hidden states) or, empty, from the rows kept leaving ``start``; write no other
        layer, commit no length.  A segment starts within what those layers hold (from there on
        they are computed again).  Returns the compute seconds.  Raises :class:`StepRejected`
        (nothing changed) for a fill of other layers, out of order or beyond what the stage holds."""
        first = self.first is not None and (start, end) == (0, self.first.layer_end)
        if self.missing != (start, end) and not first:
            raise StepRejected(f"layers [{start}, {end}) are not missing here (missing: {self.missing})")
        held_of = self.held_first if first else self.copy_held
        total = sum(s.length for s in segments)
        if total > self.max_batch_tokens:
            raise StepRejected(f"fill of {total} tokens exceeds max_batch_tokens={self.max_batch_tokens}")
        ids = {s.request_id for s in segments}
        if len(ids) != len(segments) or any(s.length < 1 or s.base for s in segments):
            raise StepRejected("a fill names a request twice, no position of one, or a cached prefix")
        if any(ids & step.ids for step in self._open):
            raise StepRejected("a request of this fill is being computed by a step")
        rows, ats = [], []
        for s in segments:
            r = self.kv.get(s.request_id)
            if first or self.copy is not None:
                at: int | None = held_of(s.request_id)
            else:  # (a request not named lacks none of them)
                at = self.unfilled.get(s.request_id, r.length if r is not None else None)
            ats.append(at or 0)
            if r is None or at is None or s.start > at or s.start + s.length > r.length or s.generation < r.generation:
                held = "nothing" if r is None else f"{r.length} positions, generation {r.generation}"
                raise StepRejected(
                    f"request {s.request_id}: a fill of [{s.start}, {s.start + s.length}) generation {s.generation} "
                    f"does not continue what it lacks ({at}) of what this stage holds ({held})"
                )
            base = next((rid for rid, x in self.kv.items() if x is r.base), None) if r.base is not None else 0
            if base is None or (base and held_of(base) < r.base_len):
                raise StepRejected(
                    f"request {s.request_id}: layers [{start}, {end}) of its cached prefix are not filled"
                )
            if not tensor.numel():  # from the rows this stage kept leaving ``start``
                kept = r.rows(s.start, s.start + s.length, start)
                if kept is None:
                    raise StepRejected(f"request {s.request_id}: no rows kept leaving layer {start}")
                rows.append(kept)
        if first and self.first is not None:
            part = self.first
        else:
            part = self.copy if self.copy is not None else carve(self.shard, start, end)
        tensor = torch.cat(rows) if rows else tensor
        self._check_input(part, tensor, total)
        step = StepRun(self, segments, tensor, 0, 0, shard=part, fill=True)
        step.advance(len(part.layers))
        for s, had in zip(segments, ats):
            self.kv.get_or_create(s.request_id).generation = s.generation  # steps of older ones are late now
            upto = max(s.start + s.length, had)
            if first:
                self.first_held[s.request_id] = upto
            elif upto == self.kv.length(s.request_id) and self.copy is None:
                self._filled(s.request_id)
            else:
                self.unfilled[s.request_id] = upto
        return step.seconds

    def recall(self, segments: tuple[Segment, ...]) -> torch.Tensor:
        """The output rows this stage sent on for each segment's positions, packed in segment
        order ([T, hidden]; ``wire.Recall``): what the next stage needs to rebuild its KV.
        Raises :class:`StepRejected` when this is the last stage or a segment reaches beyond
        what its cache holds."""
        if self.shard.is_last:
            raise StepRejected("the last stage keeps no outputs to recall")
        rows = []
        for s in segments:
            r = self.kv.get(s.request_id)
            end = s.start + s.length
            held = 0 if r is None else r.length
            if s.request_id in self.unfilled and self.missing is not None and self.missing[1] == self.shard.layer_end:
                held = self.unfilled[s.request_id]  # the rows leaving the end come with the missing layers
            got = r.rows(s.start, end, self.shard.layer_end) if r is not None and end <= held else None
            if got is None:
                raise StepRejected(
                    f"request {s.request_id}: cannot recall [{s.start}, {s.start + s.length}), this stage holds {held}"
                )
            rows.append(got)
        return torch.cat(rows).cpu()


class StepRun:
    """One step of a :class:`StageRunner`, run a few layers at a time (:meth:`advance`), so that
    its stage can run other steps (decode steps of other requests) between its layers.  Its
    writes go to its requests' buffers beyond their committed lengths and are committed when
    the last layer ran; :meth:`close` abandons it (nothing committed)."""

    def __init__(
        self,
        runner: StageRunner,
        segments: tuple[Segment, ...],
        tensor: torch.Tensor,
        topk: int,
        added: int,
        kv: KVStore | None = None,
        unjoined: bool | None = None,
        shard: Shard | None = None,
        fill: bool = False,
    ) -> None:
        sh = self.shard = runner.shard if shard is None else shard  # ``shard``: some of the runner's layers
        self.fill = fill  # only those layers' keys and values of positions held already (StageRunner.fill)
        self.runner, self.segments, self.topk, self.added = runner, segments, topk, added
        self.ids = {s.request_id for s in segments}
        self.result: torch.Tensor | None = None
        self.seconds = 0.0  # compute so far, pauses excluded
        self.layer = 0
        packed, offset = [], 0
        store = runner.kv if kv is None else kv  # (an empty store is falsy: it has a length)
        for s in segments:
            packed.append(PackedSegment(store.get_or_create(s.request_id), s.start, offset, s.length))
            offset += s.length
        # one segment at a time where the packed attention would waste most: several requests, one
        # with several rows (a prompt chunk, drafts); a step of single decode rows costs as little
        # packed (measured: 8 rows over 300 keys each, 10 layers: 53 ms packed, 61 ms segmented).
        # And wherever a request starts from cached prefixes: its history is then never joined
        self.split = getattr(sh.config, "_attn_implementation", None) == SEGMENTS and (
            (len(segments) > 1 and any(s.length > 1 for s in segments))
            or (bool(sh.keys_as_cached) and any(p.request.base is not None for p in packed))
        )
        self.cache = PackedCache(packed, self.split and bool(sh.keys_as_cached) if unjoined is None else unjoined)
        x = tensor.to(sh.device)
        self.positions = (
            torch.cat([torch.arange(s.start, s.start + s.length) for s in segments]).to(sh.device).unsqueeze(0)
        )
        if sh.is_first:
            if sh.embed is None:
                raise RuntimeError("a first stage without input embeddings")  # load_shard always gives them
            hidden = sh.embed(x).unsqueeze(0)  # [1, T, hidden]
            if sh.pos_embed is not None:  # learned absolute positions (GPT-2)
                hidden = hidden + sh.pos_embed(self.positions)
            if sh.embed_norm is not None:  # Bloom
                hidden = sh.embed_norm(hidden)
        else:
            hidden = x.to(sh.dtype).unsqueeze(0)
        self.hidden = hidden
        self.starts, self.lengths = [s.start for s in segments], [s.length for s in segments]
        self.extra: dict[str, object] = {}
        if "alibi" in sh.layer_args:  # Bloom, Falcon-ALiBi: a per-head bias on key positions
            self.extra["alibi"] = packed_alibi(sh.config, self.starts, self.lengths, sh.dtype, sh.device)
        self.cache_arg = "layer_past" if "layer_past" in sh.layer_args and "cache" not in sh.layer_args else "cache"
        self.masks: dict[int | None, torch.Tensor] = {}
        self.pos_embs: dict[str | None, object] = {}

    @torch.inference_mode()
    def advance(self, layers: int = 1) -> bool:
        """Run up to ``layers`` more layers (the last one also commits and computes the output,
        ``result``); True when the step is finished.  A failure closes the step and raises."""
        t0 = time.perf_counter()
        self.runner.computing = True
        try:
            sh = self.shard
            end = min(len(sh.layers), self.layer + max(1, layers))
            while self.layer < end:
                i = self.layer
                layer, window, kind = sh.layers[i], sh.windows[i], sh.layer_types[i]
                if window not in self.masks:
                    self.masks[window] = packed_mask(self.starts, self.lengths, window, sh.dtype, sh.device)
                if kind not in self.pos_embs:  # Gemma 3: local and global layers rotate differently
                    self.pos_embs[kind] = (
                        None
                        if sh.rotary is None
                        else (
                            sh.rotary(self.hidden, self.positions, kind)
                            if sh.rotary_per_layer_type
                            else sh.rotary(self.hidden, self.positions)
                        )
                    )
                with running(self.cache) if self.split else contextlib.nullcontext():
                    out = layer(
                        self.hidden,
                        attention_mask=self.masks[window],
                        position_ids=self.positions,
                        use_cache=True,
                        position_embeddings=self.pos_embs[kind],
                        **{self.cache_arg: self.cache},
                        **self.extra,
                    )
                self.hidden = out[0] if isinstance(out, tuple) else out
                self.layer += 1
                if sh.layer_start + self.layer in self.runner.tapes:
                    self._keep(self.hidden[0].cpu(), sh.layer_start + self.layer)
            if self.layer < len(sh.layers):
                return False
            if self.fill:  # no length moves; the rows leaving the stage's end are kept as its steps keep them
                if sh.layer_end == self.runner.loaded.layer_end and not sh.is_last:
                    self._keep(self.hidden[0].cpu(), sh.layer_end)
                self.result = self.hidden[0][:0].cpu()
            else:
                self.cache.commit()
                self.result = self._output()
            self.close()
            return True
        except BaseException:
            self.close()
            raise
        finally:
            self.seconds += time.perf_counter() - t0
            self.runner.progress += 1
            self.runner.computing = False

    def close(self) -> None:
        """No longer open: finished, failed or abandoned."""
        if self in self.runner._open:
            self.runner._open.remove(self)

    def _output(self) -> torch.Tensor:
        sh = self.shard
        hidden = self.hidden[0]  # [T, hidden]
        if sh.is_last:
            if sh.lm_head is None or sh.norm is None:
                raise RuntimeError("a last stage without its final norm and LM head")  # load_shard gives both
            ends, end = [], 0
            for s in self.segments:
                end += s.length
                ends.extend(range(end - s.logit_rows, end))  # its last rows (drafts verified: several)
            rows = hidden[torch.tensor(ends, dtype=torch.long, device=sh.device)]
            result = sh.lm_head(sh.norm(rows)).float()  # [n, vocab]
            result = _finish_logits(sh.config, result)
            if 0 < self.topk < result.shape[-1]:
                values, ids = torch.topk(result, self.topk, dim=-1)  # [n, k] descending
                lse = torch.logsumexp(result, dim=-1, keepdim=True)  # [n, 1]
                result = torch.cat([lse, values, ids.float()], dim=-1)  # [n, 1 + 2k]
        else:
            result = hidden
        if sh.device.type == "cuda":
            torch.cuda.synchronize(sh.device)
        out = result.cpu()
        if not sh.is_last:  # kept for a rebuild of the next stage, in host memory (not a GPU's)
            self._keep(out, sh.layer_end)
        return out

    def _keep(self, rows: torch.Tensor, at: int) -> None:
        """Each segment's rows of ``rows`` ([T, hidden], host memory) into its tape at layer end ``at``."""
        offset = 0
        for s, p in zip(self.segments, self.cache.segments):
            p.request.keep(s.start, rows[offset : offset + s.length], at)
            offset += s.length


def _finish_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """What some families do to logits after the LM head (their ``ForCausalLM.forward``):
    Cohere scales them (``logit_scale``), Gemma 2 soft-caps them (``final_logit_softcapping``)."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def packed_alibi(
    config: Any, starts: list[int], lengths: list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """ALiBi biases for a packed step: [heads, 1, sum(start+length)], slope_h times each key's
    position within its own request (a per-query constant shift does not change softmax)."""
    if getattr(config, "model_type", "") == "falcon" and not getattr(config, "alibi", False):
        return None
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    heads = int(getattr(config, "n_head", None) or config.num_attention_heads)
    total = sum(s + n for s, n in zip(starts, lengths))
    one = build_alibi_tensor(torch.ones(1, total, device=device), heads, torch.float32)  # [heads, 1, total]
    slopes = one[:, :, 1:2] if total > 1 else torch.zeros(heads, 1, 1, device=device)
    kpos = torch.cat([torch.arange(s + n, device=device) for s, n in zip(starts, lengths)]).float()
    return (slopes * kpos.view(1, 1, -1)).to(dtype)
