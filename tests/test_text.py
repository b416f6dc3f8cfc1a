"""Incremental detokenization: the same deltas as decoding the whole output on every token,
while decoding only a few tokens per push."""

from __future__ import annotations

import random

import pytest

from master_core.text import TextStream


class FullDecodeStream:
    """The reference: decode every output id on every token (O(n^2)), hold back text that
    ends in U+FFFD or could begin a stop string, cut at the first stop string."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token_id):
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [
            i
            for i in (text.find(s, max(0, self.emitted - max(map(len, self.stop), default=0))) for s in self.stop)
            if i >= 0
        ]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self.flush(), True
        self.text = text
        keep = max([k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        safe = len(text) - keep
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = text[self.emitted : safe], safe
        return delta, False

    def flush(self):
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


class Counting:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def run(stream, ids):
    """Per-push deltas, whether each push stopped, and the final flush."""
    out = [stream.push(i) for i in ids]
    return out, stream.flush()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from worker_core.default_model import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


SAMPLES = [
    "Hello, world! Ünïcödé façade — naïve café, 中文分词 and 日本語のテキスト, emoji 🎉🚀👩‍👩‍👧 and ∑∫√ maths.",
    "def f(x):\n    return x ** 2  # 平方\n\n<|im_end|> after a special token, then 한국어 text.",
]


def test_same_deltas_as_full_decode_on_text_with_multibyte_characters(tokenizer):
    for text in SAMPLES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # characters really split over tokens
        for stop in [(), ("ç",), ("🚀",), ("文分", "xyz"), ("return x",), ("never there",)]:
            stream = TextStream(tokenizer, stop)
            got = run(stream, ids)
            assert got == run(FullDecodeStream(tokenizer, stop), ids), stop
            assert stream.full_decodes == 0
            # and the output is the decoded text, cut at the first stop string
            full = tokenizer.decode(ids, skip_special_tokens=True)
            cut = min([full.find(s) for s in stop if s in full], default=len(full))
            assert "".join(d for d, _ in got[0]) + got[1] == full[:cut]


def test_same_deltas_as_full_decode_on_long_random_token_sequences(tokenizer):
    # random ids of the whole vocabulary: byte pieces that never make a character, halves of
    # multi-byte characters, special tokens; stop strings taken from the text itself so they hit
    rng = random.Random(15)
    vocab = len(tokenizer)
    for case in range(6):
        ids = [rng.randrange(vocab) for _ in range(1500)]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        at = rng.randrange(len(full) - 10)
        stops = [(), (full[at : at + rng.randint(1, 6)],), ("\ufffd",), (full[-3:], "zz")][case % 4]
        fast = TextStream(Counting(tokenizer), stops)
        got = run(fast, ids)
        assert got == run(FullDecodeStream(tokenizer, stops), ids), (case, stops)
        assert fast.full_decodes == 0
        if not stops:
            assert "".join(d for d, _ in got[0]) + got[1] == full


def test_each_push_decodes_a_few_tokens_not_the_whole_output(tokenizer):
    text = " ".join(SAMPLES) * 40  # about 2,000 tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counting = Counting(tokenizer)
    stream = TextStream(counting, ("never there",))
    out = "".join(stream.push(i)[0] for i in ids) + stream.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=True) and len(ids) > 1500
    assert max(counting.sizes) <= 8  # a window of the newest tokens and their context
    assert sum(counting.sizes) <= 4 * len(ids)  # O(tokens) in all, not O(tokens^2)


class Rewriting:
    """A tokenizer that renders id 1 as "q" alone but as "Q" before id 2: the context of a
    window decodes differently inside it."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(("Q" if ids[k + 1 : k + 2] == [2] else "q") if i == 1 else chr(i) for k, i in enumerate(ids))


def test_a_context_that_decodes_differently_is_recovered_by_one_full_decode():
    stream = TextStream(Rewriting())
    deltas = [stream.push(i)[0] for i in [ord("a"), 1, 2, ord("b")]]
    # "q" was final when it was returned; what follows is neither lost nor repeated
    assert deltas == ["a", "q", "\x02", "b"] and stream.full_decodes == 1 and stream.flush() == ""


class Pieces:
    """A SentencePiece-like tokenizer: "_" marks a word's leading space, and the decoder drops
    the space of the first piece.  Decoded alone, a window would glue words together; its
    left context keeps each space."""

    pieces = ["_Hello", ",", "_wor", "ld", "_and", "_good", "bye", "!"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids).replace("_", " ")
        return text[1:] if text.startswith(" ") else text


def test_the_left_context_keeps_spaces_of_a_sentencepiece_style_decoder():
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 2, 3]
    stream = TextStream(Pieces())
    deltas = [stream.push(i)[0] for i in ids]
    assert "".join(deltas) + stream.flush() == Pieces().decode(ids) == "Hello, world and goodbye! world"
    assert deltas == [d for d, _ in run(FullDecodeStream(Pieces()), ids)[0]] and stream.full_decodes == 0
