"""A generation request and its lifecycle.

Contract: :class:`SamplingParams` is the checked, typed form of what a client asked for;
:class:`Request` is one request's state as the engine sees it.  The lifecycle is
``QUEUED -> RUNNING -> DONE | FAILED | CANCELLED`` (``RUNNING -> QUEUED`` when it is preempted:
its KV cache is dropped and it is recomputed later); :meth:`Request.move` is the only way to change it and
refuses any other transition.  ``tokens`` is prompt + output; ``computed`` counts the leading
tokens whose KV cache every stage holds and ``scheduled`` those already sent (computed or in
flight), so the next input is ``tokens[scheduled:]``: a long run of it is a prefill, one
token is a decode step; ``order`` is its place in admission order, which the scheduler reads.
Its ``id`` is given by the engine that owns it.  Knows nothing about I/O.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from worker_core.sampling import SEED_MASK

from .prefix_cache import Entry
from .speculation import Speculator

if TYPE_CHECKING:
    from .grammar import Constraint, Grammar


class RequestState(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ALLOWED = {
    RequestState.QUEUED: {RequestState.RUNNING, RequestState.FAILED, RequestState.CANCELLED},
    RequestState.RUNNING: {RequestState.QUEUED, RequestState.DONE, RequestState.FAILED, RequestState.CANCELLED},
}
FINAL = frozenset({RequestState.DONE, RequestState.FAILED, RequestState.CANCELLED})


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    seed: int | None = None  # same seed + same prompt -> same tokens
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides EOS
    ignore_eos: bool = False  # keep going past EOS (benchmarks, tests)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the top N
    grammar: Grammar | None = None  # constrained decoding: every token drawn is one the grammar allows


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text that became final with this token (may be "")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "error" | "cancelled"
    error: str | None = None
    retry_after: int | None = None  # "error" because the group cannot serve: seconds a client should wait


@dataclass
class Request:
    id: int  # given by the engine that owns it
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)  # prompt + output
    computed: int = 0  # leading tokens whose KV every stage holds
    scheduled: int = 0  # leading tokens handed to the pipeline (computed or in flight)
    in_flight: int = 0  # chunks of it in the pipeline now
    order: int = -1  # admission order (smaller: admitted earlier), set each time it is admitted
    state: RequestState = RequestState.QUEUED
    finish_reason: str | None = None
    retries: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    seed: int = 0  # of its draws (the client's seed, else random): see worker_core.sampling.token_generator
    kv_id: int = 0  # the id its KV cache has on the stages: a fresh one each time it is computed from scratch
    stale_kv: list[int] = field(default_factory=list)  # earlier ids, freed once none of its steps is out
    kv_gen: int = 0  # generation of its KV id (wire.Segment.generation): raised when steps in flight are given up
    prefix: Entry | None = None  # the cached prefix its KV id starts from (master_core.prefix_cache)
    base_len: int = 0  # tokens of that prefix it uses (its computation starts there)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache for the computation that answered
    arrival: float = 0.0  # seconds (engine clock)
    first_token_at: float | None = None
    finished_at: float | None = None
    constraint: Constraint | None = None  # its grammar's state (params.grammar), advanced by each token
    spec: Speculator | None = None  # its drafting state when the engine speculates (master_core.speculation)
    written: int = 0  # end of the last segment sent under its KV id: what the stages may hold (rejected drafts)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        if self.params.grammar is not None:
            self.constraint = self.params.grammar.matcher()
        given = self.params.seed
        self.seed = (given if given is not None else secrets.randbits(64)) & SEED_MASK

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    def move(self, to: RequestState) -> None:
        if to not in _ALLOWED.get(self.state, ()):
            raise RuntimeError(f"request {self.id}: illegal transition {self.state.value} -> {to.value}")
        self.state = to
