"""Pick the next token from a row of logits, on the master.

Contract: :func:`worker_core.sampling.candidates` unpacks what the last stage sent for one row
into candidate logits, their token ids and the log-sum-exp of the full row.  :func:`sample`
then applies presence/frequency penalties over ``previous`` (the tokens generated so far) and
draws with :func:`worker_core.sampling.draw` (argmax at ``temperature == 0``, else the nucleus,
from ``generator``: a seeded request is reproducible); :func:`chosen` describes a token drawn
elsewhere (fed back by the last stage).  With top-k rows the draw is over the k most likely
tokens only (the tail beyond them is dropped); greedy choices are exact either way.
Log-probabilities are the model's own (``logit - logsumexp``, before penalties and
temperature), exact for every reported token.  Pure torch on CPU; no state of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_core.sampling import draw

from .request import SamplingParams


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
