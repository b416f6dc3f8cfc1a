"""The group's prefix cache: which token prefixes the stages still hold, and for whom.

Contract
--------
One :class:`PrefixCache` per engine decides for every stage at once (the stages never evict on
their own, so they all hold the same caches).  A request that ends (or is preempted) with its
KV cache on the stages can leave that cache behind as an :class:`Entry` (:meth:`retain`)
instead of freeing it: the KV id stays on the stages, is never written again, and its tokens'
full blocks (``block`` tokens each, keyed by a hash chain over the model and the tokens, so a
block's key names its whole prefix) become findable.  :meth:`lookup` finds, for a new prompt,
the longest run of cached full blocks, leaving at least the prompt's last token to compute
(its logits give the first new token); the request then starts at that length from the entry
that holds its last block (``wire.Segment.base``: the stages share those positions, they are
not copied).  An entry may itself start from another (``base``), so a conversation's turns
form a chain and each turn holds only its own new tokens.

Counting: an entry holds ``held`` tokens of its own on every stage (its prefix is its base's),
so a shared prefix counts once, on the master as on the workers.  ``refs`` counts the live
requests and the entries that start from it; an entry nobody refers to is evictable, least
recently used first (:meth:`evict`), and only then: an entry in use is never freed, and a KV
id is never reused, so an evicted prefix can never be served.  :meth:`clear` forgets
everything (a new pipeline: the stages that held the caches are gone or emptied).

Pure bookkeeping: no I/O, no clock (``tick`` counts uses), no torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

BLOCK_TOKENS = 16  # tokens per cached block: a prefix is reused in whole blocks


@dataclass(eq=False)
class Entry:
    """A KV cache left on the stages: ``tokens`` (positions [0, len(tokens)) are held, the first
    ``base_len`` of them by ``base``), ``held`` tokens its own on each stage."""

    kv_id: int
    tokens: tuple[int, ...]
    base: Entry | None
    base_len: int
    held: int
    refs: int = 0
    used: int = 0  # tick of its last use (LRU)
    keys: list[bytes] = field(default_factory=list)  # the block keys it answers for
    generation: int = 0  # of its KV id on the stages (wire.Segment.generation)


@dataclass(frozen=True)
class Hit:
    entry: Entry
    length: int  # tokens of the prompt the entry holds (whole blocks)


class PrefixCache:
    def __init__(self, model_key: str, block: int = BLOCK_TOKENS) -> None:
        if block < 1:
            raise ValueError("a block holds at least one token")
        self.block = block
        self._root = hashlib.blake2b(model_key.encode(), digest_size=16).digest()
        self._blocks: dict[bytes, tuple[Entry, int]] = {}  # block key -> (entry, block end position)
        self._entries: dict[int, Entry] = {}  # kv id -> entry
        self._tick = 0
        self.hits = 0  # lookups that found a prefix
        self.lookups = 0
        self.evicted = 0  # entries evicted to make room

    # ------------------------------------------------------------------ keys
    def _keys(self, tokens: Sequence[int]) -> Iterator[bytes]:
        """The key of each full block of ``tokens``: a hash of the previous key and the block."""
        key, b = self._root, self.block
        for i in range(len(tokens) // b):
            chunk = tokens[i * b : (i + 1) * b]
            key = hashlib.blake2b(key + struct.pack(f"<{b}q", *chunk), digest_size=16).digest()
            yield key

    # ------------------------------------------------------------------ queries
    @property
    def held_tokens(self) -> int:
        """Tokens the entries hold on each stage."""
        return sum(e.held for e in self._entries.values())

    @property
    def evictable_tokens(self) -> int:
        return sum(e.held for e in self._entries.values() if e.refs == 0)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, kv_id: int) -> bool:
        return kv_id in self._entries

    def lookup(self, tokens: Sequence[int], count: bool = True) -> Hit | None:
        """The longest cached prefix of ``tokens`` in whole blocks, at most ``len(tokens) - 1``
        tokens (the last one is always computed).  ``count``: a lookup the hit rate counts."""
        found: Hit | None = None
        for key in self._keys(tokens[: max(0, len(tokens) - 1)]):
            at = self._blocks.get(key)
            if at is None:
                break
            found = Hit(at[0], at[1])
        if count:
            self.lookups += 1
            self.hits += found is not None
        return found

    # ------------------------------------------------------------------ changes
    def acquire(self, entry: Entry) -> None:
        """A request starts from ``entry``: it cannot be evicted until :meth:`release`."""
        self._tick += 1
        entry.refs += 1
        entry.used = self._tick

    def release(self, entry: Entry) -> None:
        entry.refs = max(0, entry.refs - 1)

    def retain(
        self, kv_id: int, tokens: Sequence[int], held: int, base: Entry | None, base_len: int, generation: int = 0
    ) -> Entry | None:
        """Keep the cache ``kv_id`` (of ``generation``) on the stages (its first ``len(tokens)``
        positions are these tokens; it holds ``held`` tokens of its own; it started from ``base``
        at ``base_len``, whose reference passes to the entry).  Returns the entry, or None when it would add no
        block of its own (the caller frees it, and releases ``base``)."""
        first = base_len // self.block  # blocks below base_len are the base's
        keys = list(self._keys(tokens))[first:]
        if not keys or kv_id in self._entries:
            return None
        self._tick += 1
        e = Entry(kv_id, tuple(tokens), base, base_len, held, used=self._tick, generation=generation)
        self._entries[kv_id] = e
        for i, key in enumerate(keys, start=first):
            if key not in self._blocks:  # the same prefix cached twice: the older keeps answering
                self._blocks[key] = (e, (i + 1) * self.block)
                e.keys.append(key)
        return e

    def evict(self, tokens: int) -> list[int]:
        """Free at least ``tokens`` held tokens by dropping unreferenced entries, least recently
        used first (as few as it takes; fewer when not enough are unreferenced).  Returns their
        KV ids, which the stages must free."""
        dropped: list[int] = []
        freed = 0
        while freed < tokens:
            idle = [e for e in self._entries.values() if e.refs == 0]
            if not idle:
                break
            victim = min(idle, key=lambda e: e.used)
            freed += victim.held
            dropped.append(victim.kv_id)
            self._forget(victim)
            self.evicted += 1
        return dropped

    def _forget(self, e: Entry) -> None:
        del self._entries[e.kv_id]
        for key in e.keys:
            if self._blocks.get(key, (None, 0))[0] is e:
                del self._blocks[key]
        if e.base is not None:
            self.release(e.base)

    def keep_only(self, kept: Sequence[Entry]) -> list[int]:
        """Forget every entry but ``kept`` and those they start from (a stage rebuilt by a repair
        computes only what running requests use); returns the KV ids forgotten, which the stages
        must free."""
        chain: dict[int, Entry] = {}
        for e in kept:
            link: Entry | None = e
            while link is not None and link.kv_id not in chain:
                chain[link.kv_id] = link
                link = link.base
        gone = [e for e in self._entries.values() if e.kv_id not in chain]
        for e in gone:
            self._forget(e)
        return [e.kv_id for e in gone]

    def clear(self) -> list[int]:
        """Forget every entry (the pipeline that held them is gone); returns their KV ids."""
        ids = list(self._entries)
        self._entries.clear()
        self._blocks.clear()
        return ids
