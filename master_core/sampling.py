"""Pick the next token from a row of logits, on the master.

Contract: :func:`candidates` unpacks what the last stage sent for one row — the full logits,
or only its top-k (``wire.Result``) — into candidate logits, their token ids and the
log-sum-exp of the full row.  :func:`sample` then applies presence/frequency penalties over
``previous`` (the tokens generated so far), takes the argmax when ``temperature == 0``, else
scales by the temperature, keeps the nucleus (top-p) and draws from ``generator`` (a seeded
request is reproducible).  With top-k rows the draw is over the k most likely tokens only
(the tail beyond them is dropped); greedy choices are exact either way.  Log-probabilities
are the model's own (``logit - logsumexp``, before penalties and temperature), exact for
every reported token.  Pure torch on CPU; no state of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import SamplingParams


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


def candidates(row: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(candidate logits [k], their token ids [k] int64, logsumexp of the whole row)."""
    row = row.float()
    if topk:
        return row[1 : 1 + topk], row[1 + topk : 1 + 2 * topk].long(), float(row[0])
    return row, torch.arange(row.shape[0]), float(torch.logsumexp(row, dim=-1))


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
    if params.temperature == 0:
        j = int(torch.argmax(scores))
    else:
        probs = torch.softmax(scores / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # always keeps the top token
            filtered = torch.zeros_like(probs)
            filtered[order[keep]] = probs[order[keep]]
            probs = filtered / filtered.sum()
        j = int(torch.multinomial(probs, 1, generator=generator))
    token = int(ids[j])
    if params.logprobs is None:
        return Sampled(token, None, None)
    top: list[tuple[int, float]] = []
    if params.logprobs > 0:
        vals, idx = torch.topk(values, min(params.logprobs, values.shape[0]))
        top = [(int(ids[i]), float(v) - lse) for i, v in zip(idx, vals)]
    return Sampled(token, float(values[j]) - lse, top)
