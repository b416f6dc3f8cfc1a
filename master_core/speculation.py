"""Speculative decoding with prompt lookup (and optionally a draft model): the master's side.

Contract
--------
A decoding request may send, with its next token, up to ``k`` drafted tokens in the same
segment (positions ``L-1 .. L-1+k`` for a request of ``L`` tokens) and ask the last stage for
the logits of every one of those rows (``wire.Segment.rows``).  The master then verifies them
(:func:`verify`): row ``j`` gives the token at position ``L+j`` drawn exactly as a plain decode
step would draw it (the same sampler, penalties over the output so far, the request's seeded
generator for that position: :func:`worker_core.sampling.token_generator`); draft ``j`` is
accepted when that token equals it, and the first token that differs (or the bonus token after
the last draft) ends the step.  So greedy output is token-identical to a run without drafts,
and a seeded sampled request gives bit-identical tokens too.  For a prompt-lookup draft (a
point mass on token ``x``) this is exact rejection sampling with coupled randomness: the draft
is accepted with probability ``p(x)``, and on rejection the token is drawn from ``p`` with ``x``
removed, renormalized (the draw that did not hit ``x``).  KV written for rejected drafts stays
on the stages until the request's next step, which starts at the first unaccepted position:
the stages' fence (``0 < start <= cached``) truncates it there.

* :class:`~worker_core.lookup.PromptLookup` drafts from the request's own tokens (prompt +
  output, no model): the tokens that followed the latest earlier occurrence of the longest
  trailing n-gram, from an index updated as tokens arrive.
* **Inside the loop-back** (every hop and the loop-back direct, no draft model): the last
  stage drafts.  The engine gives each request of a looping micro-batch its budget ``k``
  (:meth:`Speculator.budget`) and its tokens (``wire.Draw``); the last stage draws every row,
  keeps the drafts that match, drafts the next ones by prompt lookup and feeds them straight
  back with the next token (:meth:`worker_core.session.Session._loop_back`), so a drafting
  request crosses no master on its way.  The master reads each fed-back step's chunks from
  the result before it (the drafts it names) and verifies every step as here (:func:`verify`,
  on the tokens the last stage drew: the same draws, so the same decisions).
* :class:`Speculator` is one request's drafting state: its lookup, the per-token acceptance
  rate it measured (decayed counts), its ``k`` (:func:`choose_k`: most expected tokens per
  second of a trip, from the acceptance rate and the measured time of a trip of ``1 + k``
  tokens), switched off (``k`` = 0) where drafting does not pay, re-probed every
  ``REPROBE`` steps.
* :func:`plan_drafts` turns the decode chunks of a micro-batch into speculative ones, within
  the request's ``max_tokens`` and context, the step's token budget and the free KV room; in
  three steps the engine also uses with a draft model: :func:`draft_caps` (how many each may
  carry), the drafts (:func:`lookup_drafts`; the engine asks :mod:`worker_core.draft_model` for
  those lookup found nothing for), :func:`apply_drafts`.
* With a draft model (``--draft-model``) prompt lookup still goes first: a request drafts from
  its own tokens where they have a match (free, and long where the text is copied), else the
  draft model drafts greedily (a point mass too, so :func:`verify` stays exact).
* :func:`inputs` is a chunk's token ids (its drafts appended).
* Where the master drafts (the pipeline does not loop back, or a draft model drafts), a request
  that drafts (:attr:`Speculator.drafting`) does not loop back: with a draft model the engine
  gives the loop-back to micro-batches none of whose requests drafts (drafting switched off,
  or nothing found to draft for ``MISSES`` steps in a row), and looks for drafts again after
  each loop.

Not done here: constrained (grammar) requests never draft (their next token depends on the
grammar's state after each draft); the draft model does not draft inside the loop-back (it
runs on the master).  Pure: no I/O, no clock; torch only in :func:`verify`'s callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from worker_core.lookup import PromptLookup

from .scheduler import Chunk

K_START = 4  # drafts a request begins with
K_MAX = 8  # drafts per step at most
REPROBE = 16  # decode steps with drafting switched off before it tries again
DECAY = 0.8  # weight of the older observations of the acceptance rate at each new one
PROBE_K = 2  # drafts of a re-probe
MISSES = 4  # decode steps in a row with nothing to draft before the request may loop back again


def choose_k(alpha: float, trip: Callable[[int], float], k_max: int = K_MAX) -> int:
    """The number of drafts with the most expected tokens per second of a trip: ``1 + alpha
    + ... + alpha**k`` tokens (each draft accepted with probability ``alpha`` once the ones
    before it were) in ``trip(1 + k)`` seconds.  0: drafting does not pay."""
    best, best_rate = 0, 1.0 / max(trip(1), 1e-9)
    expected = 1.0
    for k in range(1, k_max + 1):
        expected += alpha**k
        rate = expected / max(trip(1 + k), 1e-9)
        if rate > best_rate * 1.02:  # a 2% margin: a draft must pay for itself
            best, best_rate = k, rate
    return best


def _flat_trip(tokens: int) -> float:
    """A trip's time before any is measured: mostly fixed, a little more per token."""
    return 1.0 + 0.05 * tokens


@dataclass
class Speculator:
    """One request's drafting state (see the module docstring)."""

    lookup: PromptLookup = field(default_factory=PromptLookup)
    k: int = K_START
    accepted: float = 0.0  # decayed count of drafts accepted
    tried: float = 0.0  # decayed count of drafts verified (accepted, or the first rejected)
    idle: int = 0  # decode steps since drafting was switched off
    pending: tuple[int, ...] = ()  # the drafts of the step in flight
    trips: int = 0  # steps that carried drafts
    drafted: int = 0  # drafts sent
    hits: int = 0  # drafts accepted
    misses: int = 0  # decode steps in a row that found nothing to draft
    by_model: bool = False  # the pending drafts are the draft model's (worker_core.draft_model), not lookup's
    in_loop: bool = False  # the pending drafts were made by the last stage inside the loop-back
    model_k: int = K_START  # the draft model's drafts per step (its time counted: observe's draft_cost)
    model_idle: int = 0  # steps the draft model was not asked since it was switched off

    @property
    def drafting(self) -> bool:
        """It drafts now: its decode steps go through the master (which verifies), not around
        the loop-back (whose fed-back steps carry no drafts).  Not while drafting is switched
        off, nor after ``MISSES`` steps in a row found nothing to draft."""
        return self.k > 0 and self.misses < MISSES

    @property
    def alpha(self) -> float:
        """Measured probability that a draft is accepted, given the ones before it were
        (the prior: one accepted of two)."""
        return (self.accepted + 1.0) / (self.tried + 2.0)

    def budget(self, steps: int = 1) -> int:
        """Drafts to try on each of the next ``steps`` decode steps (a loop-back's: the master's
        first and those fed back); a re-probe when switched off long enough, and then those
        steps count towards the next one."""
        if self.k:
            return self.k
        self.idle += 1
        probe = self.idle >= REPROBE
        self.idle += steps - 1
        return PROBE_K if probe else 0

    def observe(
        self, drafted: int, accepted: int, trip: Callable[[int], float] | None, draft_cost: float | None = None
    ) -> None:
        """A step verified ``drafted`` drafts and accepted the first ``accepted``: update the
        acceptance rate and choose ``k`` again.  ``draft_cost``: the drafts were a draft model's,
        each costing that many seconds: ``model_k`` is chosen with that cost added to the trip
        (prompt lookup's ``k``, free drafts, without it)."""
        self.trips += 1
        self.drafted += drafted
        self.hits += accepted
        self.accepted = self.accepted * DECAY + accepted
        self.tried = self.tried * DECAY + accepted + (1 if accepted < drafted else 0)
        base = trip or _flat_trip
        self.k = choose_k(self.alpha, base)
        self.idle = 0
        if draft_cost is not None:
            self.model_k = min(self.k, choose_k(self.alpha, lambda n: base(n) + (n - 1) * draft_cost))
            self.model_idle = 0

    def model_budget(self, steps: int = 1) -> int:
        """Drafts the draft model may make on each of the next ``steps`` steps (0: it does not pay
        now; a re-probe after ``REPROBE`` steps without it, as :meth:`budget` counts them).  Asked
        only where prompt lookup found nothing."""
        if self.model_k:
            return self.model_k
        self.model_idle += 1
        probe = self.model_idle >= REPROBE
        self.model_idle += steps - 1
        return PROBE_K if probe else 0


class _Params(Protocol):
    @property
    def max_tokens(self) -> int: ...


class Drafting(Protocol):
    """What drafting reads of a request (:class:`master_core.request.Request`)."""

    @property
    def tokens(self) -> list[int]: ...
    @property
    def output(self) -> list[int]: ...
    @property
    def params(self) -> _Params: ...
    @property
    def constraint(self) -> object | None: ...
    @property
    def spec(self) -> Speculator | None: ...


def eligible(chunk: Chunk, req: Drafting) -> bool:
    """A decode step of a request that may carry drafts: its one next token, nothing else of
    it in the step, no grammar (its state would have to follow every draft)."""
    return (
        req.spec is not None
        and chunk.length == 1
        and chunk.want_logits
        and chunk.start + 1 == len(req.tokens)
        and req.constraint is None
    )


def draft_caps(
    chunks: Sequence[Chunk], reqs: Sequence[Drafting], step_room: int, kv_room: int, context: int
) -> list[int | None]:
    """Per chunk, the drafts it may carry at most (None: it may carry none, not a decode step
    that may draft): the request's budget (:meth:`Speculator.budget`, called once per step),
    within its ``max_tokens`` and the context, and each of ``step_room`` and ``kv_room`` (shared
    by the micro-batch: :func:`apply_drafts` cuts them in order).  Clears every ``pending``."""
    caps: list[int | None] = []
    for c, r in zip(chunks, reqs):
        spec = r.spec
        if spec is not None:
            spec.pending = ()
        if spec is None or not eligible(c, r):
            caps.append(None)
            continue
        caps.append(
            max(
                0,
                min(
                    spec.budget(),
                    r.params.max_tokens - len(r.output) - 1,  # the bonus token is one more
                    context - len(r.tokens) - 1,
                    step_room,
                    kv_room,
                ),
            )
        )
    return caps


def apply_drafts(
    chunks: Sequence[Chunk],
    reqs: Sequence[Drafting],
    proposals: Sequence[tuple[int, ...] | None],
    step_room: int,
    kv_room: int,
    by_model: Sequence[bool] = (),
) -> tuple[list[Chunk], int]:
    """The micro-batch's chunks with ``proposals`` (per chunk; None: not a drafting decode step)
    added to its decode steps (``Chunk.rows`` = 1 + drafts; each request's ``spec.pending``
    holds its drafts, ``spec.by_model`` whether the draft model made them), cut in order to the
    step's token budget ``step_room`` (``max_batch_tokens`` less its chunks) and ``kv_room`` (KV
    tokens free on every stage beyond one per running request); and the KV tokens they add."""
    out: list[Chunk] = []
    added = 0
    for i, (c, r, proposal) in enumerate(zip(chunks, reqs, proposals)):
        spec = r.spec
        if spec is None or proposal is None:
            out.append(c)
            continue
        drafts = proposal[: max(0, min(step_room, kv_room))]
        spec.misses = 0 if drafts else spec.misses + 1
        if not drafts:
            out.append(c)
            continue
        spec.pending, spec.in_loop = drafts, False
        spec.by_model = bool(by_model[i]) if i < len(by_model) else False
        n = len(drafts)
        step_room -= n
        kv_room -= n
        added += n
        out.append(replace(c, length=1 + n, rows=1 + n))
    return out, added


def lookup_drafts(reqs: Sequence[Drafting], caps: Sequence[int | None]) -> list[tuple[int, ...] | None]:
    """Prompt lookup's drafts for each chunk of :func:`draft_caps` (None where it has no cap)."""
    return [
        None if cap is None or r.spec is None else (r.spec.lookup.draft(r.tokens, cap) if cap > 0 else ())
        for r, cap in zip(reqs, caps)
    ]


def plan_drafts(
    chunks: Sequence[Chunk], reqs: Sequence[Drafting], step_room: int, kv_room: int, context: int
) -> tuple[list[Chunk], int]:
    """The micro-batch's chunks with prompt lookup's drafts added to its decode steps
    (:func:`draft_caps`, :func:`lookup_drafts`, :func:`apply_drafts`: no draft model), and
    the KV tokens they add.  Drafts never run past ``max_tokens`` or the context."""
    caps = draft_caps(chunks, reqs, step_room, kv_room, context)
    return apply_drafts(chunks, reqs, lookup_drafts(reqs, caps), step_room, kv_room)


def inputs(req: Drafting, chunk: Chunk) -> list[int]:
    """The token ids of ``chunk`` of ``req``: its tokens, and the drafts of a speculative one."""
    if chunk.rows > 1 and req.spec is not None:
        return [*req.tokens[chunk.start : chunk.start + 1], *req.spec.pending]
    return req.tokens[chunk.start : chunk.start + chunk.length]


def verify(drafts: Sequence[int], take: Callable[[int], int | None]) -> int:
    """Take the tokens of a speculative step's rows in order, ``take(j)`` drawing row ``j``'s
    token exactly as a plain decode step would (and handing it to the request; None: the
    request ended with it, or before).  Stops after the first token that is not the draft
    it follows, or after the bonus token of the last row.  Returns how many drafts were
    accepted (the step's KV is valid up to and including the last accepted draft)."""
    accepted = 0
    for j in range(len(drafts) + 1):
        token = take(j)
        if token is None or j == len(drafts) or token != drafts[j]:
            break
        accepted += 1
    return accepted
