"""Constrained decoding: a JSON schema, a regex or a Lark grammar compiled into per-token masks.

Contract
--------
The engine is llguidance (MIT, no dependencies; chosen by measurement against xgrammar and
outlines-core, see docs/structured-outputs.md).  :class:`Grammars` is built once per master
from the tokenizer (``n_vocab`` = the model's logits width, ``eos`` = the engine's stop ids);
building its token table takes about 2 s for a 49k vocabulary and happens on the first
constrained request, off the event loop.

``await grammars.compile(spec)`` turns a :class:`Spec` (what the client asked for) into a
:class:`Grammar`, off the event loop on a single compile thread of its own (a heavy schema
never takes a thread the tokenizer needs) and bounded: the source is at most
``MAX_SOURCE_BYTES``, the engine's own limits (``LLParserLimits``) bound its work and memory,
and ``COMPILE_SECONDS`` bounds the wait.  Whatever the engine refuses, or what exceeds a bound,
raises :class:`GrammarError` with the reason (the API's 400).  A compiled grammar has already
computed its first mask (the costliest one).

``grammar.matcher()`` gives one request its own :class:`Constraint` (a copy of the compiled
state).  ``constraint.allowed(ids)`` says which of candidate token ids [k] the grammar allows
next; ``constraint.advance(token)`` consumes the drawn token.  Pure CPU; a matcher is used by
one request only, on the event loop (a mask costs tens of microseconds once compiled; see
docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

MAX_SOURCE_BYTES = 64 * 1024  # a schema, regex or grammar larger than this is refused
COMPILE_SECONDS = 5.0  # a compile still running after this is refused (it ends on its own: limits below)
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema's objects and arrays
CACHED = 64  # compiled grammars kept (by their spec)

# JSON as compact as json.dumps writes it (", " and ": "), no free whitespace: a model cannot
# fill max_tokens with blanks inside an object (and "x-guidance" in a schema cannot turn it on)
JSON_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions (a TypedDict)

Kind = Literal["json_object", "json_schema", "regex", "lark"]


class GrammarError(ValueError):
    """The grammar cannot be used: the reason, in one line, for the client."""


@dataclass(frozen=True)
class Spec:
    kind: Kind
    source: str = ""  # the schema (JSON text), the regex or the Lark grammar; "" for json_object

    def engine_text(self) -> str:
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        return llguidance.LLMatcher.grammar_from_lark(self.source)


def schema_spec(schema: Any) -> Spec:
    """A JSON schema (a dict, as the client sent it) as a :class:`Spec`, bounded in size and depth."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the schema nests {depth} levels deep; the limit is {MAX_SCHEMA_DEPTH}")
    return Spec("json_schema", _bounded(json.dumps(schema)))


def text_spec(kind: Kind, source: str) -> Spec:
    return Spec(kind, _bounded(source))


def _bounded(source: str) -> str:
    n = len(source.encode("utf-8"))
    if n > MAX_SOURCE_BYTES:
        raise GrammarError(f"the grammar has {n} bytes; the limit is {MAX_SOURCE_BYTES}")
    return source


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH:  # deep enough to refuse: stop walking
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


class Constraint:
    """One request's grammar state."""

    def __init__(self, matcher: Any, words: int) -> None:
        self._m = matcher
        self._bits = torch.zeros(words, dtype=torch.int32)  # bitmask of allowed tokens, 32 per word
        self.mask_seconds = 0.0  # time spent computing masks (benchmarks)
        self.masks = 0

    def allowed(self, ids: torch.Tensor) -> torch.Tensor:
        """Which of the candidate token ids ``ids`` [k] int64 the grammar allows next: bool [k]."""
        t = time.perf_counter()
        fill(self._m, self._bits)
        self.mask_seconds += time.perf_counter() - t
        self.masks += 1
        if self._m.is_error():
            raise GrammarError(f"the grammar failed: {self._m.get_error()}")
        ok = ids < self._bits.numel() * 32
        safe = torch.where(ok, ids, torch.zeros_like(ids))
        bit = (self._bits[safe >> 5] >> (safe & 31)) & 1
        return ok & bit.bool()

    def advance(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and takes nothing more (only an end of sequence)."""
        return bool(self._m.is_stopped())


class Grammar:
    """A compiled grammar: copies of its warmed state are the requests' constraints."""

    def __init__(self, spec: Spec, matcher: Any, words: int) -> None:
        self.spec = spec
        self._proto = matcher
        self._words = words
        self._lock = threading.Lock()

    def matcher(self) -> Constraint:
        with self._lock:
            return Constraint(self._proto.deep_copy(), self._words)


class Grammars:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size  # the width of the model's logits
        self._eos = sorted(eos_ids)
        self._tok: Any = None
        self._tok_lock = threading.Lock()
        # one thread of its own: a slow compile queues other compiles, never tokenizing or templating
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._cache: OrderedDict[Spec, Grammar] = OrderedDict()  # agents send the same tools every turn

    def _tokenizer(self) -> Any:
        with self._tok_lock:
            if self._tok is None:
                import llguidance.hf

                eos = self._eos or None
                try:  # masks as wide as the model's logits
                    self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=eos)
                except ValueError:  # the tokenizer names more tokens than the logits have: its own size
                    self._tok = llguidance.hf.from_tokenizer(self._hf, eos_token=eos)
            return self._tok

    def _limits(self) -> Any:
        import llguidance

        # the engine's own bounds on work and memory (defaults are 1M / 200k / 50k / 250k / 500k):
        # a schema past these is refused instead of stalling masks or growing without bound
        return llguidance.LLParserLimits(
            initial_lexer_fuel=1_000_000,
            step_lexer_fuel=200_000,
            step_max_items=50_000,
            max_lexer_states=50_000,
            max_grammar_size=200_000,
        )

    def compile_now(self, spec: Spec) -> Grammar:
        """Compile in this thread (the compile thread, tests and benchmarks)."""
        import llguidance

        try:
            text = spec.engine_text()
        except ValueError as e:
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {e}") from None
        tok = self._tokenizer()
        limits = self._limits()
        problem = llguidance.LLMatcher.validate_grammar(text, tok, limits=limits)
        if problem:
            raise GrammarError(_one_line(problem))
        matcher = llguidance.LLMatcher(tok, text, log_level=0, limits=limits)
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        bits = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
        fill(matcher, bits)  # the first mask is the costliest: paid here
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        return Grammar(spec, matcher, bits.numel())

    async def compile(self, spec: Spec) -> Grammar:
        """``compile_now`` on the compile thread, bounded; the last ``CACHED`` results are kept."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        loop = asyncio.get_running_loop()
        if self._tok is None:  # the token table, once (seconds): not part of any grammar's bound
            await loop.run_in_executor(self._pool, self._tokenizer)
        fut = loop.run_in_executor(self._pool, self.compile_now, spec)
        try:
            grammar = await asyncio.wait_for(asyncio.shield(fut), COMPILE_SECONDS)
        except asyncio.TimeoutError:
            raise GrammarError(f"the grammar did not compile within {COMPILE_SECONDS:.0f} s") from None
        self._cache[spec] = grammar
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return grammar

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def fill(matcher: Any, bits: torch.Tensor) -> None:
    """The matcher's next mask into ``bits`` (int32 [words], contiguous; 32 tokens per word).
    (Not ``llguidance.torch``: importing it runs ``torch.compile``, seconds on a CPU.)"""
    matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * bits.element_size())


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return "; ".join(lines[:3])[:500] or "the grammar is invalid"
