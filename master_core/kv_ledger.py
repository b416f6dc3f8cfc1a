"""The master's ledger of the requests' KV caches on the stages: their ids, the cached prefixes
ended requests left behind, and what an epoch change keeps or frees.

Contract
--------
A running request's cache is known to every stage by its KV id (``Request.kv_id``, numbered
here from 1) and a generation (``Request.kv_gen``) that the stages hold to refuse a step sent
under an older one.  :class:`KVLedger` is the only place that hands out, retires and frees
those ids:

* :meth:`KVLedger.restart` gives a request a fresh id (a step of the old one still on its way
  can then only miss) and starts it after the longest cached prefix of its tokens;
  :meth:`KVLedger.resume` keeps the id under a newer generation, going on from what every
  stage holds (``Request.computed``).
* :meth:`KVLedger.release` returns the ids the stages may drop once none of a request's steps
  is out; a request that ended well or was preempted leaves its cache to the prefix cache
  (:mod:`master_core.prefix_cache`) instead.
* :meth:`KVLedger.fit` evicts idle cached prefixes (least recently used first) until the
  running requests and the cache fit every stage's budget; evicted ids leave with the next
  step (:meth:`KVLedger.take_drops`, ``Step.drop``) and by ``Free``.
* :meth:`KVLedger.reset` is the KV side of an epoch change: every cache on the old stages is
  freed and the requests restart, except when only one stage is rebuilt (the group's repair):
  the running requests' ids and the cached prefixes they use are kept (:class:`Repairing`) for
  the survivors, which hold their caches, and the requests resume once that stage is rebuilt.

Requests' fields are mutated here; the engine owns the requests, their tokens and streams.
No I/O beyond ``WorkerLink.free`` (a queued frame); no clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from .group import Group
from .link import WorkerLink
from .prefix_cache import PrefixCache
from .request import Request, RequestState
from .standby import Rebuilt

KEEPABLE = frozenset({RequestState.DONE, RequestState.CANCELLED, RequestState.QUEUED})  # QUEUED: preempted


@dataclass
class Repairing:
    """One stage being rebuilt (``rebuilt``: which, and how) while ``survivors`` (the other stages
    of the previous pipeline, in order) keep their caches: the running requests kept there
    (request id -> KV id), and the KV ids to free on the new pipeline once it serves (requests
    that ended meanwhile)."""

    rebuilt: Rebuilt
    survivors: list[WorkerLink]
    kept: dict[int, int]
    free_later: list[int] = field(default_factory=list)


class KVLedger:
    def __init__(self, group: Group, model_key: str, caching: bool) -> None:
        self.group = group
        self.prefix = PrefixCache(model_key)  # the KV caches ended requests left on the stages
        self.caching = caching  # keep and reuse them (benchmarks compare with and without)
        self.repairing: Repairing | None = None  # a stage being replaced: what the others kept
        self._ids = itertools.count(1)
        self._drops: list[int] = []  # evicted from the prefix cache, dropped by the next step (Step.drop)
        self.recomputed_tokens = 0  # positions sent again after a failed step, a reset or a preemption
        self.resumed = 0  # requests that went on from what every stage holds after a step given up on
        self.reset_restarts = 0  # running requests restarted from their tokens by an epoch change

    def free_everywhere(self, ids: list[int]) -> None:
        """Tell every stage of the current pipeline to drop ``ids`` (between the pipelines of a
        repair, the new one is told once it serves)."""
        if not self.group.stages and self.repairing is not None:  # between pipelines: its survivors hold them
            self.repairing.free_later += ids
        for link in self.group.stages:
            link.free(ids)

    def release(self, req: Request, stale_only: bool = False) -> list[int]:
        """The KV ids of ``req`` the stages may drop now (none of its steps is out): its stale
        ones and, unless ``stale_only`` (it runs on), its current one, which it then no longer
        has.  A request that ended well or was preempted leaves its current one to the prefix
        cache instead (kept on the stages, unless it would add no block of its own)."""
        ids, req.stale_kv = req.stale_kv, []
        if stale_only or not req.kv_id:
            return ids
        kept = None
        rebuilding = self.repairing is not None and req.id in self.repairing.kept  # not on the new stage yet
        if self.caching and req.state in KEEPABLE and req.computed > req.base_len and not rebuilding:
            held = own(req)  # what its stages hold of their own (a loop may have run ahead of computed)
            kept = self.prefix.retain(req.kv_id, req.tokens[: req.computed], held, req.prefix, req.base_len, req.kv_gen)
        if kept is None:
            ids.append(req.kv_id)
            if req.prefix is not None:
                self.prefix.release(req.prefix)
        req.kv_id, req.prefix, req.base_len = 0, None, 0
        return ids

    def restart(self, req: Request) -> None:
        """Compute ``req`` from scratch under a fresh KV id: a step of the old one still on its
        way (fed back by the last stage, or slow past its deadline) can then only miss its cache
        on a stage, never land in the new one.  The old id is freed once none of its steps is out.
        "From scratch" starts after the longest cached prefix of its tokens (all but the last),
        which the stages share instead of computing again (not after two failed steps: the
        prefix may be what fails)."""
        if req.kv_id:
            req.stale_kv.append(req.kv_id)
        if req.prefix is not None:
            self.prefix.release(req.prefix)
        req.kv_id = next(self._ids)
        req.kv_gen += 1
        req.prefix, req.base_len = None, 0
        hit = self.prefix.lookup(req.tokens) if self.caching and req.retries < 2 else None
        if hit is not None:
            self.prefix.acquire(hit.entry)
            req.prefix, req.base_len = hit.entry, hit.length
        self.recomputed_tokens += max(0, req.scheduled - req.base_len)
        req.computed = req.scheduled = req.base_len
        req.written = 0
        if req.spec is not None:
            req.spec.pending = ()
        if req.first_token_at is None:
            req.cached_tokens = min(req.base_len, len(req.prompt))

    def resume(self, req: Request) -> None:
        """Go on from what every stage holds (``computed``) after a step of ``req`` was given up
        on with its stages alive: only what was in flight is sent again, under a newer
        generation of its KV id.  A stage the late step reaches first writes there what the
        new step writes again (the same tokens at the same positions; the new step starts
        within its cache and truncates it there); one the new step reaches first refuses the
        late one.  Its other steps still out are not folded in (their generation is older)."""
        self.recomputed_tokens += req.scheduled - req.computed
        req.scheduled = req.computed
        req.kv_gen += 1
        if req.spec is not None:
            req.spec.pending = ()
        self.resumed += 1

    def fit(self, running: Iterable[Request], extra: int = 0) -> None:
        """Evict idle cached prefixes (least recently used first) until the ``running``
        requests' KV, one more token each, ``extra`` tokens and the cache fit every stage's
        budget.  The stages drop them with the next step (``Step.drop``: it can overtake a
        ``Free`` on a direct hop) and by ``Free``."""
        used = sum(own(r) + 1 for r in running) + self.prefix.held_tokens + extra
        over = used - self.group.kv_tokens
        if over > 0:
            self._evict(over)

    def forget_idle(self) -> int:
        """Evict every cached prefix no running request uses (benchmarks start each mode cold);
        returns how many."""
        return self._evict(1 << 62)

    def _evict(self, tokens: int) -> int:
        ids = self.prefix.evict(tokens)
        if ids:
            self._drops.extend(ids)
            self.free_everywhere(ids)
        return len(ids)

    def take_drops(self) -> tuple[int, ...]:
        """The evicted ids the next step tells the stages to drop (each is handed out once)."""
        drops, self._drops = tuple(self._drops), []
        return drops

    def room(self, running: Iterable[Request]) -> int:
        """KV tokens every stage could still give a step's extra positions (run-ahead loop-back
        steps, drafts): the budget less what ``running`` requests hold (one more token each)
        and the cached prefixes that cannot be evicted."""
        return self.group.kv_tokens - sum(own(r) + 1 for r in running) - self.pinned()

    def pinned(self) -> int:
        """Tokens of cached prefixes that running requests use (they cannot be evicted)."""
        return self.prefix.held_tokens - self.prefix.evictable_tokens

    def prefill_need(self, req: Request) -> int:
        """KV tokens a waiting request takes when admitted now: its tokens beyond the cached
        prefix it would start from, plus that prefix's own tokens when nothing holds it yet
        (admitting it makes them unevictable)."""
        if not self.caching or req.kv_id:
            return len(req.tokens)
        hit = self.prefix.lookup(req.tokens, count=False)
        if hit is None:
            return len(req.tokens)
        return len(req.tokens) - hit.length + (hit.entry.held if hit.entry.refs == 0 else 0)

    def reset(
        self, running: Iterable[Request], previous: list[WorkerLink], rebuilt: Rebuilt | None, always: int
    ) -> None:
        """The KV side of an epoch change: free the ``running`` requests' caches on the stages
        that were serving (``previous``; the live ones among them keep no cache for a pipeline
        that is gone) and restart the requests from their tokens, except when only one stage is
        ``rebuilt`` (the group's repair): the survivors keep the running requests' caches and the
        cached prefixes they start from (the others are forgotten), and the requests resume once
        that stage is rebuilt (:attr:`repairing`).
        ``always``: an id freed on those stages whatever they held (the start-up profile's)."""
        ids = [always]
        self._drops.clear()
        holders = list(previous)
        pending, self.repairing = self.repairing, None
        if pending is not None:  # a repair given up before it served: what it kept goes too
            holders += [link for link in pending.survivors if link not in holders]
        running = list(running)
        if rebuilt is None:
            ids += self.prefix.clear()  # the cached prefixes go with their stages
        else:  # those the running requests start from stay, and are rebuilt with them
            ids += self.prefix.keep_only([r.prefix for r in running if r.kv_id and r.prefix])
        kept: dict[int, int] = {}
        for req in running:
            if rebuilt is not None and req.kv_id:
                ids += self.release(req, stale_only=True)
                kept[req.id] = req.kv_id
                self.resume(req)  # from what every stage holds: the rebuilt one once rebuilt
                continue
            req.prefix = None  # forgotten with the rest of the cache
            ids += self.release(req)  # nothing of it is left on those stages now
            self.restart(req)
            self.reset_restarts += 1
        if rebuilt is not None:
            survivors = [x for i, x in enumerate(previous) if i != rebuilt.lost]
            self.repairing = Repairing(rebuilt, survivors, kept)
        for link in holders:
            link.free(ids)


def own(r: Request) -> int:
    """KV tokens a request holds or has in flight of its own on each stage (a loop-back runs
    ahead of its tokens, rejected drafts stay until its next step; the cached prefix it starts
    from is counted once, in the cache)."""
    return max(len(r.tokens), r.scheduled, r.written) - r.base_len


def base(r: Request, start: int) -> int:
    """The cached prefix a segment of ``r`` at ``start`` tells the stages to start from."""
    return r.prefix.kv_id if r.prefix is not None and start == r.base_len else 0
