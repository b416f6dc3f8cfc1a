"""Quantize a stage's decoder layers in place: weight storage in 8 or 4 bits, through bitsandbytes.

Contract
--------
``quantize_layer(layer, precision, device, dtype)`` replaces, inside one decoder layer whose
weights are loaded on the CPU in the compute ``dtype``:

* every ``nn.Linear`` by the bitsandbytes module of that precision (``int8``:
  ``Linear8bitLt``, LLM.int8() with the usual outlier threshold of 6; ``int4``:
  ``Linear4bit`` NF4, blocks of :data:`INT4_BLOCK`, double-quantized statistics, except the
  value and down projections, which ``int4`` keeps in int8: see
  :func:`worker_core.precision.kept_in_int8`), computing in ``dtype``;
* every stacked mixture-of-experts weight (a 3-D parameter ``[experts, out, in]``, as the
  fused experts of transformers 5 hold them) by :class:`QuantizedExperts`, which stores each
  expert's matrix with the same bitsandbytes quantizers and gives the family's own forward
  the expert's matrix (``weight[e]``) dequantized into ``dtype`` when it is used;

then moves the layer to ``device`` (on CUDA the bitsandbytes parameters quantize on that move,
the library's standard path; on the CPU its CPU backend does the same).  Norms, biases and the
router stay in ``dtype``.  ``none`` only moves the layer.  Returns nothing; raises
:class:`QuantizeError` when the library is missing or the layer holds nothing it can quantize.

The input embeddings and the LM head are not quantized: they live on the first and last stage
only, the head (tied to the embeddings in small models) is the most precision-sensitive matrix
of the model since its errors go straight into every logit, and an embedding lookup reads one
row per token, so 8 or 4 bits there would save memory on two stages for a measurable loss.

``module_bytes(module)`` is the bytes a module really holds, quantization statistics included.
The precision names and the planning estimate per weight live in :mod:`worker_core.precision`
(torch-free, for the master); they are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .precision import INT4_BLOCK, PRECISIONS, Precision, bytes_per_param, kept_in_int8

__all__ = [
    "INT4_BLOCK",
    "PRECISIONS",
    "Precision",
    "QuantizeError",
    "QuantizedExperts",
    "bytes_per_param",
    "module_bytes",
    "quantize_layer",
]

INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (the default of transformers and Petals)


class QuantizeError(RuntimeError):
    """The layer cannot be quantized here (library missing, nothing to quantize)."""


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # a dependency of the package: only a broken install lacks it
        raise QuantizeError(f"--quantize needs bitsandbytes ({e})") from e
    return bnb


class QuantizedExperts:
    """Stacked expert matrices ``[experts, out, in]`` stored per expert in 8 or 4 bits.

    ``experts[e]`` is expert ``e``'s ``[out, in]`` matrix dequantized into the compute dtype on
    the device (what the family's eager forward reads as ``self.gate_up_proj[e]``).  ``shape``
    and ``dtype`` are those of the original parameter.  Only the quantized blocks are kept."""

    def __init__(self, weight: torch.Tensor, precision: Precision, device: torch.device) -> None:
        bnb = _bnb()
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.precision = precision
        self._parts: list[tuple[torch.Tensor, Any]] = []
        for e in range(weight.shape[0]):
            w = weight[e].to(device)  # [out, in]
            if precision is Precision.INT8:
                cb, scale, _ = bnb.functional.int8_vectorwise_quant(w.float())  # int8 [out, in], float32 [out]
                self._parts.append((cb, scale))
            else:
                packed, state = bnb.functional.quantize_4bit(
                    w, blocksize=INT4_BLOCK, compress_statistics=True, quant_type="nf4"
                )
                self._parts.append((packed, state))

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, index: Any) -> torch.Tensor:
        data, stat = self._parts[int(index)]
        if self.precision is Precision.INT8:
            return (data.float() * (stat.unsqueeze(1) / 127.0)).to(self.dtype)  # [out, in]
        return _bnb().functional.dequantize_4bit(data, stat).to(self.dtype)  # [out, in]

    def nbytes(self) -> int:
        total = 0
        for data, stat in self._parts:
            total += data.numel() * data.element_size()
            total += stat.numel() * stat.element_size() if isinstance(stat, torch.Tensor) else _state_bytes(stat)
        return total


def _quantized_linear(linear: nn.Linear, precision: Precision, device: torch.device, dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    weight = linear.weight.data  # [out, in] on the CPU: the move to the device quantizes it
    if precision is Precision.INT8:
        q = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,  # inference: the int8 copy only
            threshold=INT8_THRESHOLD,
        )
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=INT4_BLOCK, compress_statistics=True, quant_type="nf4"
        )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    # the module's own ``to`` quantizes (Module.to on a parent would keep the old parameter
    # object and drop the int8 row scales bitsandbytes returns on the new one)
    return q.to(device)


def quantize_layer(layer: nn.Module, precision: Precision, device: torch.device, dtype: torch.dtype) -> None:
    if precision is Precision.NONE:
        layer.to(device)
        return

    def of(name: str) -> Precision:
        return Precision.INT8 if precision is Precision.INT4 and kept_in_int8(name) else precision

    swapped = 0
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _quantized_linear(child, of(name), device, dtype))
                swapped += 1
        for name, p in list(parent.named_parameters(recurse=False)):
            if p.dim() == 3:  # stacked experts [experts, out, in]
                del parent._parameters[name]
                object.__setattr__(parent, name, QuantizedExperts(p.data, of(name), device))
                swapped += 1
    if not swapped:
        raise QuantizeError(f"{type(layer).__name__} has no linear or expert weights to quantize")
    layer.to(device)


def _state_bytes(state: Any) -> int:
    """Bytes of a bitsandbytes 4-bit QuantState (absmax, code, nested statistics)."""
    total = 0
    for attr in ("absmax", "code", "offset"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    return total + (_state_bytes(nested) if nested is not None else 0)


def module_bytes(module: nn.Module) -> int:
    """Bytes the module's weights really take: parameters and buffers at their storage dtype,
    the int8 row scales and 4-bit block statistics bitsandbytes keeps beside them, and
    :class:`QuantizedExperts` blocks."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size()
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += _state_bytes(state)
    for m in module.modules():
        for v in vars(m).values():
            if isinstance(v, QuantizedExperts):
                total += v.nbytes()
    return total
