"""The group's precision and what a weight costs at it; no torch (the master and simulator use it).

Contract: :class:`Precision` names how a stage stores its decoder layers (``none``: the compute
dtype; ``int8``; ``int4``); ``Precision.parse`` turns user text into one or a ``ValueError``.
``bytes_per_param(precision, itemsize, in_features)`` is the planning estimate of the bytes one
weight of a quantized matrix takes, statistics included (the storage itself is
:mod:`worker_core.quantize`).
"""

from __future__ import annotations

from enum import Enum

INT4_BLOCK = 64  # weights per NF4 block (one absmax each; bitsandbytes' default)
INT4_STAT_BYTES = 1 / INT4_BLOCK + 4 / (INT4_BLOCK * 256)  # per weight: a uint8 absmax per block, double-quantized


class Precision(str, Enum):
    NONE = "none"  # the compute dtype (float32 on CPU, bfloat16/float16 on GPU)
    INT8 = "int8"  # bitsandbytes LLM.int8(): int8 weights, a float32 scale per output row
    INT4 = "int4"  # bitsandbytes NF4: 4-bit weights in blocks of 64, double-quantized absmax

    @staticmethod
    def parse(text: str) -> Precision:
        try:
            return Precision(text.strip().lower())
        except ValueError:
            raise ValueError(f"unknown precision {text!r}; use none, int8 or int4") from None


PRECISIONS = tuple(p.value for p in Precision)

# name components of the matrices ``int4`` keeps in int8: value projections and the MLP's down
# projection under the names the transformers families use
INT8_IN_INT4 = frozenset({"v_proj", "down_proj", "w2", "fc2", "dense_4h_to_h"})


def kept_in_int8(name: str) -> bool:
    """Whether the module or tensor ``name`` (dotted; e.g. ``model.layers.3.mlp.down_proj.weight``)
    is a matrix ``int4`` stores in int8."""
    return not INT8_IN_INT4.isdisjoint(name.split("."))


def bytes_per_param(precision: Precision, itemsize: int, in_features: int, kept: bool = False) -> float:
    """Bytes one weight of a quantizable matrix takes at ``precision`` (planning estimate):
    ``none`` the compute dtype's ``itemsize``; ``int8`` one byte plus a float32 row scale shared
    by ``in_features`` weights; ``int4`` half a byte plus its share of the block statistics, or
    the ``int8`` figure for a matrix ``kept`` in int8 (see :func:`kept_in_int8`)."""
    if precision is Precision.INT8 or (precision is Precision.INT4 and kept):
        return 1.0 + 4.0 / max(1, in_features)
    if precision is Precision.INT4:
        return 0.5 + INT4_STAT_BYTES
    return float(itemsize)
