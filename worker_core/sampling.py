"""Drawing one token from a row's candidate logits: on the master, and on a last stage that
feeds its tokens straight back to the first stage (``wire.Step.loop``).

Contract
--------
``candidates(row, topk)`` unpacks one row of a last stage's output.  ``draw(values, ids,
temperature, top_p, generator)`` returns one token id from candidate logits ``values`` [k] and
their token ids ``ids`` [k]: the argmax (the first of equal maxima) when ``temperature == 0``;
else one draw from ``generator`` over ``softmax(values / temperature)`` restricted to the
nucleus (the most likely tokens whose mass before them is below ``top_p``; the top token
always stays).  ``token_generator(seed, position)`` is the generator for the token a request
puts at ``position``: a pure function of the two, so a request's draws do not depend on which
process makes them, nor on replays.  Pure torch on CPU.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant: neighbouring positions get unrelated seeds
SEED_MASK = (1 << 64) - 1  # seeds are taken modulo 2**64


def token_generator(seed: int, position: int) -> torch.Generator:
    """The generator for the token at ``position`` of a request seeded with ``seed``."""
    return torch.Generator().manual_seed((seed ^ (position * _MIX)) & SEED_MASK)


def candidates(row: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One row of a last stage's output (``wire.Result``: the full logits, or with ``topk`` the
    packed top-k) as (candidate logits [k], their token ids [k] int64, logsumexp of the row)."""
    row = row.float()
    if topk:
        return row[1 : 1 + topk], row[1 + topk : 1 + 2 * topk].long(), float(row[0])
    return row, torch.arange(row.shape[0]), float(torch.logsumexp(row, dim=-1))


def draw(values: torch.Tensor, ids: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(ids[int(torch.argmax(values))])
    probs = torch.softmax(values.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the top token
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        probs = filtered / filtered.sum()
    return int(ids[int(torch.multinomial(probs, 1, generator=generator))])
