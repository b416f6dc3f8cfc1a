"""Turn generated token ids into text as it becomes final, and find stop strings.

Contract: ``TextStream(tokenizer, stop)``.  ``push(token_id)`` returns ``(delta, stopped)``:
``delta`` is the text that is now final and safe to show, ``stopped`` whether a stop string
has appeared (the output is then cut just before it and nothing after it is ever shown).
Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could still be
the start of a stop string.  ``flush()`` returns whatever was held back at the end.  The
concatenation of all deltas equals the decoded output cut at the first stop string.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.text = ""  # decoded text, cut at a stop string once one is found
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """How many trailing characters might begin a stop string."""
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self.flush(), True
        self.text = text
        safe = len(text) - self._holdback(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= self.emitted:
            return "", False
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
