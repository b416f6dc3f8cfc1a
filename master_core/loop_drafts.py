"""Speculation inside the loop-back: the master's side of the steps a last stage drafts.

Contract
--------
Where every hop and the loop-back are direct, a looping micro-batch's requests are drafted for
by the last stage (:meth:`worker_core.session.Session._loop_back`); the engine decides how many
steps loop and each request's draft budget (:meth:`master_core.engine.Engine._loop_steps`).
The pure pieces are here:

* :func:`loop_draw`: the ``wire.Draw`` of a request for the loop (its budget, the tokens it may
  still take, the last of its tokens for the last stage's prompt lookup: ``HISTORY_TOKENS``
  shared by the micro-batch, so the step's header stays within ``wire.MAX_HEADER_BYTES``; the
  drafts its first step carries);
* :func:`first_drafts`: the loop's first step drafts too, by the master's prompt lookup (decode
  steps only, leaving a token for every step after it, within the step's token budget);
* :func:`fed_back`: the chunks of the step the last stage fed back, read from the result before
  it (each row's drawn token, the drafts it carried and the ones sent on); a live request keeps
  the new drafts to verify (``Speculator.pending``) and counts them as scheduled;
* :func:`pending`: the drafts a chunk carries.
"""

from __future__ import annotations

from worker_core.wire import Draw

from .journey import Journey
from .request import Request
from .scheduler import Chunk
from .speculation import apply_drafts, eligible

# tokens of history one loop's first step carries in all (its requests share them): at 8 digits
# and a comma each in the header's JSON, well within wire.MAX_HEADER_BYTES (tests/test_speculative.py)
HISTORY_TOKENS = 16_384


def pending(c: Chunk, r: Request) -> tuple[int, ...]:
    """The drafts chunk ``c`` of ``r`` carries (its rows beyond the first)."""
    return r.spec.pending if c.rows > 1 and r.spec is not None else ()


def _left(r: Request, context: int) -> int:
    """Tokens ``r`` may still take (its ``max_tokens``, the context)."""
    return min(r.params.max_tokens - len(r.output), context - len(r.tokens))


def loop_draw(r: Request, c: Chunk, k: int, context: int, history: int, model_k: int = 0) -> Draw:
    """How the last stage draws ``r``'s tokens in a loop (``k`` drafts per step at most, of
    which ``model_k`` its draft model's where prompt lookup finds nothing; ``c``, the loop's first
    step, may carry drafts of its own; the last ``history`` of its tokens to draft from)."""
    p = r.params
    if not k:
        return Draw(p.temperature, p.top_p, r.seed)
    tail = tuple(r.tokens[-history:]) if history > 0 else ()
    return Draw(p.temperature, p.top_p, r.seed, k, _left(r, context), tail, pending(c, r), min(model_k, k))


def first_drafts(
    chunks: list[Chunk], reqs: list[Request], ks: list[int], loop: int, context: int, max_batch_tokens: int
) -> list[Chunk]:
    """The first step of a loop with its drafts (prompt lookup, on the master): up to each
    request's ``k``, leaving a token for each of the ``loop`` steps after it, within the step's
    token budget (the KV the loop may write is reserved already)."""
    proposals: list[tuple[int, ...] | None] = []
    for c, r, k in zip(chunks, reqs, ks):
        cap = min(k, _left(r, context) - 1 - loop)
        spec = r.spec if cap > 0 and eligible(c, r) else None  # a decode step (not a prompt's last chunk)
        proposals.append(spec.lookup.draft(r.tokens, cap) if spec is not None else None)
    room = max_batch_tokens - sum(c.length for c in chunks)
    out, _ = apply_drafts(chunks, reqs, proposals, room, room)
    return out


def fed_back(
    chunks: list[Chunk], carried: list[tuple[int, ...]], went: Journey, reqs: list[Request], live: list[bool]
) -> tuple[list[Chunk], list[tuple[int, ...]]]:
    """The chunks of the step the last stage fed back after ``chunks`` (which carried the drafts
    ``carried``), from what it named in ``went``: each row's drawn token, and the drafts it sent
    on.  Each continues from its first token that is not the draft it follows (or after its last
    draft), with the new drafts after it; a request still running on the same KV generation
    (``live``) keeps those drafts to verify (``Speculator.pending``) and counts them as
    scheduled."""
    out, drafts, row = [], [], 0
    for i, (c, r) in enumerate(zip(chunks, reqs)):
        drawn, before = went.tokens[row : row + c.rows], carried[i]
        row += c.rows
        taken = 1  # no tokens named: the last stage could not loop back (that step fails unsent)
        while taken <= min(len(before), len(drawn) - 1) and drawn[taken - 1] == before[taken - 1]:
            taken += 1
        ahead = went.drafts[i] if went.drafts else ()
        nxt = Chunk(c.request_id, c.start + c.length - c.rows + taken, 1 + len(ahead), True, 1 + len(ahead))
        out.append(nxt)
        drafts.append(ahead)
        if not live[i]:
            continue
        if ahead and r.spec is not None:
            r.spec.pending, r.spec.in_loop = ahead, True
            r.spec.by_model = bool(went.by_model[i]) if went.by_model else False
        r.scheduled = max(r.scheduled, nxt.start + nxt.length)
    return out, drafts
