"""Prompt lookup: drafting the next tokens of a request from its own tokens, no model.

Contract
--------
:class:`PromptLookup` indexes one request's tokens (prompt + output) as they arrive:
``draft(tokens, k)`` returns up to ``k`` tokens that followed the latest earlier occurrence of
the longest trailing n-gram of ``tokens`` (``MAX_NGRAM`` down to ``MIN_NGRAM`` tokens), or ()
when there is none.  ``tokens`` must extend what it saw before (a shorter list starts the index
again).  Used by the master (:mod:`master_core.speculation`) and by a last stage that drafts
inside the loop-back (:mod:`worker_core.session`).  Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3  # longest trailing n-gram looked up
MIN_NGRAM = 2  # shortest (a single token matches too often in open text to be worth a draft)


class PromptLookup:
    """An n-gram index over one request's tokens: n-gram -> the position after its latest
    occurrence that has a token after it (the trailing n-gram itself is never its own match)."""

    def __init__(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}
        self._seen = 0  # tokens indexed so far

    def _update(self, tokens: Sequence[int]) -> None:
        # every n-gram ending at position i - 1 gets a continuation once token i exists
        for i in range(max(1, self._seen), len(tokens)):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if i - n >= 0:
                    self._index[tuple(tokens[i - n : i])] = i
        self._seen = max(self._seen, len(tokens))

    def draft(self, tokens: Sequence[int], k: int) -> tuple[int, ...]:
        """Up to ``k`` tokens that may follow ``tokens`` (empty: no earlier match)."""
        if k <= 0:
            return ()
        if len(tokens) < self._seen:  # the request was cut back (never in practice): index again
            self._index.clear()
            self._seen = 0
        self._update(tokens)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) < n:
                continue
            at = self._index.get(tuple(tokens[len(tokens) - n :]))
            if at is not None:
                return tuple(tokens[at : at + k])
        return ()


class Histories:
    """The tokens of the requests a last stage drafts for inside the loop-back, by KV id, each
    with its :class:`PromptLookup`: started from the history the master sent, extended with
    every token the stage draws, forgotten when the loop ends or the request is freed.  At most
    ``limit`` requests (the oldest is forgotten first: it then drafts nothing)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._by_id: dict[int, tuple[list[int], PromptLookup]] = {}

    def start(self, kv_id: int, history: Sequence[int]) -> None:
        self._by_id.pop(kv_id, None)
        while len(self._by_id) >= self.limit:
            del self._by_id[next(iter(self._by_id))]
        self._by_id[kv_id] = (list(history), PromptLookup())

    def extend(self, kv_id: int, tokens: Sequence[int]) -> None:
        held = self._by_id.get(kv_id)
        if held is not None:
            held[0].extend(tokens)

    def draft(self, kv_id: int, k: int) -> tuple[int, ...]:
        """Up to ``k`` drafts for what follows the request's tokens (() when it is not held)."""
        held = self._by_id.get(kv_id)
        return held[1].draft(held[0], k) if held is not None and k > 0 else ()

    def tokens(self, kv_id: int) -> list[int]:
        """The request's tokens held (empty when it is not held)."""
        held = self._by_id.get(kv_id)
        return held[0] if held is not None else []

    def forget(self, kv_ids: Sequence[int]) -> None:
        for kv_id in kv_ids:
            self._by_id.pop(kv_id, None)

    def __len__(self) -> int:
        return len(self._by_id)
