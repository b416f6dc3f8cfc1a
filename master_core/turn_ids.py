"""The token ids a chat prompt's earlier turns had, so a conversation's prompt keeps a stable prefix.

Contract
--------
Chat clients send the whole conversation every turn, the group's answers as text.  Tokenizing
that text again need not give the ids the group generated (a byte-level BPE merges what the model
emitted piecewise, a partial UTF-8 character comes back as U+FFFD), and then the prefix cache
(:mod:`master_core.prefix_cache`) reuses nothing past the first changed token.  :class:`TurnIds`
remembers, for recent answers, the text they end (the rendered prompt followed by the answer as
decoded) and the ids the group computed for it (prompt ids followed by the generated ids).
:meth:`TurnIds.ids` turns a rendered prompt into ids: the ids of the longest remembered text the
prompt starts with, then the tokenizer's ids of the rest.  The ids always decode to the prompt's
text; where a remembered answer is used, they are the tokens the model produced for it.

:meth:`TurnIds.remember` keeps an answer only when its ids decode (special tokens included) to
text, so a later prompt matches only where it repeats that text exactly; a stop string, a special
token the API hides, or a client that reformats the answer just means no match (the whole prompt
is tokenized as before).  At most ``max_entries`` texts of at most ``max_chars`` characters in all
are kept, least recently used dropped first.  No I/O; thread-safe (a lock), so the caller runs
it off the event loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

MAX_ENTRIES = 64
MAX_CHARS = 4_000_000  # characters of remembered text in all


class TurnIds:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_chars: int = MAX_CHARS) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._texts: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0  # prompts that started with a remembered text

    def __len__(self) -> int:
        return len(self._texts)

    def remember(
        self, prompt_text: str, prompt_ids: Sequence[int], answer_text: str, answer_ids: Sequence[int]
    ) -> None:
        """Keep ``prompt_text + answer_text`` -> ``prompt_ids + answer_ids`` (see the contract)."""
        text = prompt_text + answer_text
        if not answer_ids or len(text) > self.max_chars:
            return
        with self._lock:
            old = self._texts.pop(text, None)
            if old is not None:
                self._chars -= len(text)
            self._texts[text] = [*prompt_ids, *answer_ids]
            self._chars += len(text)
            while len(self._texts) > self.max_entries or self._chars > self.max_chars:
                dropped, _ = self._texts.popitem(last=False)
                self._chars -= len(dropped)

    def ids(self, text: str, tokenize: Callable[[str], list[int]]) -> list[int]:
        """``text``'s ids: a remembered prefix's ids, then ``tokenize`` of the rest."""
        best, head = "", []
        with self._lock:
            for known in self._texts:
                if len(known) > len(best) and len(known) < len(text) and text.startswith(known):
                    best = known
            if best:
                self._texts.move_to_end(best)
                self.hits += 1
                head = self._texts[best]
        return [*head, *tokenize(text[len(best) :])]
