"""Pick the next token from a row of logits, on the master.

Contract: ``sample(logits, params, generator, previous)`` applies presence/frequency
penalties over ``previous`` (the tokens generated so far), then greedy argmax when
``temperature == 0``, else temperature scaling, nucleus (top-p) filtering and a draw from
``generator`` (so a seeded request is reproducible).  Log-probabilities are those of the
distribution the token was drawn from (after penalties and temperature, before top-p).
Pure torch on CPU; no state of its own.
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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, previous: list[int]) -> Sampled:
    # logits: [vocab] float32
    logits = logits.float()
    if previous and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(previous).unique(return_counts=True)
        logits = logits.clone()
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
    if params.temperature == 0:
        token = int(torch.argmax(logits))
        scaled = logits
    else:
        scaled = logits / params.temperature
        probs = torch.softmax(scaled, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # always keeps the top token
            filtered = torch.zeros_like(probs)
            filtered[order[keep]] = probs[order[keep]]
            probs = filtered / filtered.sum()
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return Sampled(token, None, None)
    logp = torch.log_softmax(scaled, dim=-1)
    top = []
    if params.logprobs > 0:
        vals, idx = torch.topk(logp, min(params.logprobs, logp.shape[0]))
        top = [(int(i), float(v)) for i, v in zip(idx, vals)]
    return Sampled(token, float(logp[token]), top)
