"""Pick the next token from a row of logits, on the master.

Contract: :func:`worker_core.sampling.candidates` unpacks what the last stage sent for one row
into candidate logits, their token ids and the log-sum-exp of the full row.  :func:`sample`
then applies presence/frequency penalties over ``previous`` (the tokens generated so far) and
draws with :func:`worker_core.sampling.draw` (argmax at ``temperature == 0``, else the nucleus,
from ``generator``: a seeded request is reproducible); :func:`chosen` describes a token drawn
elsewhere (fed back by the last stage).  :func:`next_token` is the whole way from one row a
step brought back to a request's next token: unpacked, masked by the request's grammar (if it
has one), cut to the configured top-k (as the last stage would have cut it), then drawn or,
when the last stage drew it, described.  With top-k rows the draw is over the k most likely
tokens only (the tail beyond them is dropped); greedy choices are exact either way.
Log-probabilities are the model's own (``logit - logsumexp``, before penalties and
temperature), exact for every reported token.  Pure torch on CPU; no state of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from worker_core.sampling import candidates, draw, token_generator

from .request import SamplingParams

if TYPE_CHECKING:
    from .grammar import Constraint


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


def sample(
    values: torch.Tensor,
    ids: torch.Tensor,
    lse: float,
    params: SamplingParams,
    generator: torch.Generator,
    previous: list[int],
) -> Sampled:
    scores = values
    if previous and (params.presence_penalty or params.frequency_penalty):
        prev_ids, counts = torch.tensor(previous).unique(return_counts=True)
        hit = ids.unsqueeze(1) == prev_ids.unsqueeze(0)  # [k, distinct previous]
        penalty = params.presence_penalty * hit.any(1).float() + params.frequency_penalty * (
            hit.float() @ counts.float()
        )
        scores = values - penalty
    return chosen(values, ids, lse, draw(scores, ids, params.temperature, params.top_p, generator), params)


def chosen(values: torch.Tensor, ids: torch.Tensor, lse: float, token: int, params: SamplingParams) -> Sampled:
    """``token`` (one of ``ids``: drawn here, or by the last stage that fed it back) with the
    log-probabilities the request asked for."""
    if params.logprobs is None:
        return Sampled(token, None, None)
    j = int((ids == token).nonzero()[0, 0])
    top: list[tuple[int, float]] = []
    if params.logprobs > 0:
        vals, idx = torch.topk(values, min(params.logprobs, values.shape[0]))
        top = [(int(ids[i]), float(v) - lse) for i, v in zip(idx, vals)]
    return Sampled(token, float(values[j]) - lse, top)


def next_token(
    row: torch.Tensor,
    topk: int,
    keep: int,
    params: SamplingParams,
    constraint: Constraint | None,
    drawn: int | None,
    seed: int,
    tokens: list[int],
    output: list[int],
) -> Sampled:
    """A request's next token from ``row`` (packed as the step asked: ``topk``, 0 for whole
    rows): masked by ``constraint``; else cut to ``keep`` (the configured top-k), so a request's
    tokens do not depend on whom it was batched with; ``drawn`` by the last stage, or drawn here
    from the request's ``seed`` at position ``len(tokens)`` with penalties over ``output``."""
    values, ids, lse = candidates(row, topk)
    if constraint is not None:
        values = masked(values, constraint.allowed(ids))
    elif topk != keep:
        values, ids = top(values, ids, keep)
    if drawn is not None:
        return chosen(values, ids, lse, drawn, params)
    return sample(values, ids, lse, params, token_generator(seed, len(tokens)), output)


def masked(values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Candidate logits [k] with every token the grammar does not allow at -inf."""
    if not bool(allowed.any()):
        raise RuntimeError("the grammar allows no candidate token")
    return values.masked_fill(~allowed, float("-inf"))


def top(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of candidate logits [n] and their ids, as the last stage packs them."""
    if not 0 < k < values.shape[0]:
        return values, ids
    v, i = torch.topk(values, k)
    return v, ids[i]
