"""Turn generated token ids into text as it becomes final, and find stop strings.

Contract: ``TextStream(tokenizer, stop)``.  ``push(token_id)`` returns ``(delta, stopped)``:
``delta`` is the text that is now final and safe to show, ``stopped`` whether a stop string
has appeared (the output is then cut just before it and nothing after it is ever shown).
Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could still be
the start of a stop string.  ``flush()`` returns whatever was held back at the end.  The
concatenation of all deltas equals the decoded output cut at the first stop string.

Cost per token is O(new tokens + longest stop string), not O(output): the tokenizer decodes
only a short window, ``ids[prefix:]``, and the text of its left context ``ids[prefix:read]``
is cut off the front (the prefix/read offsets of incremental detokenization).  The context
makes a token decode as it does inside the whole output (a leading space, the rest of a
multi-byte character).  The window's text is final once it ends in a whole character; then
the offsets move up to the end (``prefix`` to the old ``read``).  Should the context ever
decode differently inside the window than alone, one full decode recovers (counted in
``full_decodes``).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._reach = max((len(s) for s in self.stop), default=0)  # characters a stop string may reach back
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read]: the left context of the next decode
        self._read = 0  # ids[:_read] decode to final text
        self._context = ""  # decode(ids[_prefix:_read])
        self._final = 0  # characters of final text (of ids[:_read])
        self._stable = ""  # final text not yet returned (held back: it may begin a stop string)
        self._tail = ""  # text of ids[_read:], not final: it ends in an incomplete character
        self._shown = ""  # the last _reach characters already returned
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self.full_decodes = 0  # recoveries by one decode of the whole output

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _holdback(self, text: str) -> int:
        """How many trailing characters might begin a stop string."""
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep

    def _pending(self) -> str:
        """Decoded text after what was returned (final text held back, then the tail)."""
        ahead = self.emitted - self._final  # > 0: part of the tail was already returned
        return self._tail[ahead:] if ahead > 0 else self._stable + self._tail

    def _advance(self) -> None:
        """Decode the window after the newest token: final text moves the offsets up."""
        window = self._decode(self.ids[self._prefix :])
        if window.startswith(self._context):
            new = window[len(self._context) :]
            if new and not new.endswith(REPLACEMENT):
                before = self._final
                self._stable = self._stable + new if self.emitted <= before else new[self.emitted - before :]
                self._final += len(new)
                self._tail = ""
                self._prefix, self._read = self._read, len(self.ids)
                self._context = self._decode(self.ids[self._prefix : self._read])
            else:
                self._tail = new  # nothing (a special token) or an unfinished character: wait
            return
        # the context decodes differently inside the window than alone (a tokenizer that
        # rewrites across tokens): decode the whole output once, and keep what was returned
        self.full_decodes += 1
        text = self._decode(self.ids)
        if text and not text.endswith(REPLACEMENT):
            self._final, self._tail = len(text), ""
            self._prefix, self._read = self._read, len(self.ids)
            self._context = self._decode(self.ids[self._prefix : self._read])
        else:
            self._tail = text[self._final :]
        self._stable = text[self.emitted : self._final]

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        self._advance()
        pending = self._pending()
        if not pending:
            return "", False
        text = self._shown + pending  # the end of the decoded text; returned up to len(self._shown)
        done = len(self._shown)
        if self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                delta = text[done : max(done, min(hits))]
                self._finish(delta)
                self.stopped = True
                self._stable = self._tail = ""
                self._final = self.emitted
                return delta, True
        safe = len(text) - self._holdback(text)
        while safe > done and text[safe - 1] == REPLACEMENT:
            safe -= 1
        if safe <= done:
            return "", False
        delta = text[done:safe]
        self._finish(delta)
        return delta, False

    def _finish(self, delta: str) -> None:
        """Record ``delta`` as returned."""
        taken = len(delta)
        from_stable = min(taken, len(self._stable)) if self.emitted <= self._final else 0
        self._stable = self._stable[from_stable:]
        self.emitted += taken
        if self._reach:
            self._shown = (self._shown + delta)[-self._reach :]

    def flush(self) -> str:
        delta = "" if self.stopped else self._pending()
        self._finish(delta)
        return delta
