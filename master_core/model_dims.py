"""The model's dimensions as the master uses them, parsed once from the checkpoint.

Contract
--------
``ModelDims.parse(config, counts)`` turns a transformers config (any family) and the
checkpoint's parameter counts (:func:`worker_core.shard.parameter_counts`) into a frozen,
typed record; it is the only code in ``master_core`` that reads the config object.  A missing
or non-positive dimension is a ``ValueError`` with one line.  ``ModelDims.load(folder)``
(blocking: call it in a thread) does both from a checkpoint folder.  The master parses once at
start and passes the record to the group, the engine and the API.

Sizes are counted from what the checkpoint really holds: ``stage_params(start, end)`` is the
parameters a stage serving layers ``[start, end)`` loads (its layers, plus the embeddings on
the first stage and the head on the last), so mixture-of-experts layers count every expert.
``stage_bytes(start, end, precision, itemsize)`` is the same stage in bytes: its decoder layers
at the group's precision (``none``: the compute dtype's ``itemsize`` per parameter; ``int8``
about 1 byte plus a float32 scale per row; ``int4`` about 0.52 byte with its block statistics,
and int8's figure for the value and down projections it keeps in int8 (``layer_kept_params``),
see :func:`worker_core.precision.bytes_per_param`; norms are counted as quantized too, a
rounding error of well under 1%), the embeddings and head at ``itemsize`` (they are never
quantized).  ``kv_bytes(itemsize)`` is K and V of one token in one layer at the compute dtype;
``token_bytes(start, end, itemsize, rows)`` what one cached token costs a stage of ``[start, end)``
in the memory its KV is in (its KV on every layer and ``rows`` hidden rows: the rows a stage
keeps for a rebuild of the next one are in host memory, :mod:`worker_core.kv_cache`, the same
memory only on a CPU).
``shape(precision, itemsize)`` is the planner's :class:`~master_core.placement.ModelShape` in those
bytes, and ``lightest_fit(members, itemsize)`` the first precision (none, int8, int4) at which
the planner can place the model on ``members`` (None: not even int4), for the error that says
what would fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker_core.precision import Precision, bytes_per_param

from .placement import KV_RESERVE_TOKENS, Member, ModelShape, PlacementError, plan_pipeline

DEFAULT_CONTEXT = 2048  # tokens, for configs that name no maximum position


@dataclass(frozen=True)
class ModelDims:
    num_layers: int  # decoder layers
    hidden_size: int  # activation width between stages
    vocab_size: int  # logits per row
    max_positions: int  # context length in tokens (prompt + output)
    kv_bytes_per_token: int  # K and V of one token in one layer at float32 (an upper bound for every dtype)
    layer_params: tuple[int, ...]  # parameters of each decoder layer, from the checkpoint's headers
    embed_params: int  # input embeddings and other weights outside the layers (first stage)
    head_params: int  # LM head (the embeddings again when tied) and final norm (last stage)
    layer_kept_params: tuple[int, ...] = ()  # of each layer's parameters, those int4 keeps in int8 (none if empty)

    @staticmethod
    def parse(config: Any, counts: tuple[Sequence[int], int, int, Sequence[int]]) -> ModelDims:
        """From a transformers config and ``(per-layer, embedding, head, per-layer kept in int8)``
        parameter counts."""

        def positive(name: str, value: object) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"the model config has no usable {name} ({value!r})")
            return value

        heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        hidden = positive("hidden_size", getattr(config, "hidden_size", None))
        attention_heads = positive("num_attention_heads", getattr(config, "num_attention_heads", None))
        head_dim = getattr(config, "head_dim", None) or hidden // attention_heads
        layers, embed, head, kept = counts
        return ModelDims(
            num_layers=positive("num_hidden_layers", getattr(config, "num_hidden_layers", None)),
            hidden_size=hidden,
            vocab_size=positive("vocab_size", getattr(config, "vocab_size", None)),
            max_positions=int(getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT),
            kv_bytes_per_token=2 * positive("key/value heads", heads) * positive("head_dim", head_dim) * 4,
            layer_params=tuple(int(n) for n in layers),
            embed_params=int(embed),
            head_params=int(head),
            layer_kept_params=tuple(int(n) for n in kept),
        )

    @staticmethod
    def load(folder: Path) -> ModelDims:
        """Parse the checkpoint in ``folder`` (its config and safetensors headers; blocking)."""
        from worker_core.shard import load_config, parameter_counts

        return ModelDims.parse(load_config(folder), parameter_counts(folder))

    @property
    def largest_layer_params(self) -> int:
        return max(self.layer_params, default=0)

    def stage_params(self, start: int, end: int) -> int:
        """Parameters a stage serving layers ``[start, end)`` holds."""
        first = self.embed_params if start == 0 else 0
        last = self.head_params if end == self.num_layers else 0
        return sum(self.layer_params[start:end]) + first + last

    def layer_bytes(self, index: int, precision: Precision, itemsize: int) -> int:
        """Bytes decoder layer ``index`` takes at ``precision`` (``itemsize``: compute dtype)."""
        kept = self.layer_kept_params[index] if self.layer_kept_params else 0
        rest = self.layer_params[index] - kept
        return int(
            rest * bytes_per_param(precision, itemsize, self.hidden_size)
            + kept * bytes_per_param(precision, itemsize, self.hidden_size, kept=True)
        )

    def largest_layer_bytes(self, precision: Precision, itemsize: int) -> int:
        return max((self.layer_bytes(i, precision, itemsize) for i in range(self.num_layers)), default=0)

    def stage_bytes(self, start: int, end: int, precision: Precision, itemsize: int) -> int:
        """Weight bytes a stage serving layers ``[start, end)`` holds: its layers at
        ``precision``, the embeddings (first stage) and head (last stage) at ``itemsize``."""
        first = self.embed_params if start == 0 else 0
        last = self.head_params if end == self.num_layers else 0
        layers = sum(self.layer_bytes(i, precision, itemsize) for i in range(start, end))
        return layers + (first + last) * itemsize

    def kv_bytes(self, itemsize: int) -> int:
        """K and V of one token in one layer when the stage computes with ``itemsize``-byte elements."""
        return self.kv_bytes_per_token // 4 * itemsize

    def token_bytes(self, start: int, end: int, itemsize: int, rows: int) -> int:
        """Bytes one cached token takes on the stage of layers ``[start, end)`` with ``rows`` kept
        hidden rows of it in the same memory (a CPU stage's tape: 1 on any stage but the last; a
        standby's whole model: one per stage end it keeps, ``Assign.tapes``)."""
        return self.kv_bytes(itemsize) * (end - start) + self.hidden_size * itemsize * rows

    def shape(self, precision: Precision, itemsize: int) -> ModelShape:
        """The model as the planner sees it: every layer at the largest layer's bytes at
        ``precision``, embeddings and head at ``itemsize``, KV reserve at ``itemsize``."""
        return ModelShape(
            num_layers=self.num_layers,
            layer_bytes=self.largest_layer_bytes(precision, itemsize),
            first_bytes=self.embed_params * itemsize,
            last_bytes=self.head_params * itemsize,
            kv_bytes_per_layer=self.kv_bytes(itemsize) * KV_RESERVE_TOKENS,
        )

    def lightest_fit(self, members: Sequence[Member], itemsize: int) -> Precision | None:
        """The first of none, int8, int4 at which ``members`` can hold the model (None: none)."""
        for precision in Precision:
            try:
                plan_pipeline(self.shape(precision, itemsize), members)
            except PlacementError:
                continue
            return precision
        return None
