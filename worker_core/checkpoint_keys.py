"""Map a model's parameter names to the tensors a checkpoint stores them as.

Contract: ``sources(name, files)`` returns how to build the model parameter ``name`` from the
checkpoint tensors listed in ``files`` (name -> file): ``("copy", [key])`` when the
checkpoint has it under the same (or a known renamed) key, ``("fuse_gate_up" | "stack", [...])``
when transformers 5 fuses per-expert weights into one parameter that checkpoints keep per
expert (``experts.gate_up_proj`` = for each expert, gate then up concatenated, stacked over
experts; ``experts.down_proj`` = the experts' down projections stacked), or None when nothing fits.  ``build`` makes the
tensor from the loaded pieces.  This covers the Hugging Face layouts of Mixtral
(``block_sparse_moe``, ``w1/w2/w3``), Qwen2-MoE, Qwen3-MoE and DeepSeek-V2.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

_RENAMES = ((".mlp.", ".block_sparse_moe."),)
_GATE, _UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")


def _renamed(name: str) -> list[str]:
    out = [name]
    for a, b in _RENAMES:
        if a in name:
            out.append(name.replace(a, b))
    return out


def _expert_keys(prefix: str, names: tuple[str, ...], files: Collection[str]) -> list[str] | None:
    """``prefix.{e}.{name}.weight`` for e = 0.. as long as they exist, under one of ``names``."""
    for n in names:
        keys = []
        e = 0
        while f"{prefix}.{e}.{n}.weight" in files:
            keys.append(f"{prefix}.{e}.{n}.weight")
            e += 1
        if keys:
            return keys
    return None


def sources(name: str, files: Collection[str]) -> tuple[str, list[str]] | None:
    for cand in _renamed(name):
        if cand in files:
            return "copy", [cand]
    m = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)$", name)
    if not m:
        return None
    for prefix in _renamed(m.group(1)):
        if m.group(2) == "gate_up_proj":
            gate, up = _expert_keys(prefix, _GATE, files), _expert_keys(prefix, _UP, files)
            if gate and up and len(gate) == len(up):
                return "fuse_gate_up", [k for pair in zip(gate, up) for k in pair]
        else:
            down = _expert_keys(prefix, _DOWN, files)
            if down:
                return "stack", down
    return None


def build(kind: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    if kind == "copy":
        return pieces[0]
    if kind == "fuse_gate_up":  # pieces: gate_0, up_0, gate_1, up_1 ...
        return torch.stack([torch.cat(pieces[i : i + 2], dim=0) for i in range(0, len(pieces), 2)])  # [E, 2I, H]
    if kind == "stack":
        return torch.stack(pieces)  # [E, H, I]
    raise ValueError(f"unknown build kind {kind!r}")
