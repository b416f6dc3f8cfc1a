"""Attention of a packed step one segment at a time (CPU stages).

Contract
--------
A packed step (:mod:`worker_core.kv_cache`) holds several requests' rows, attended as one
sequence: every row against the keys of *all* the step's requests, through a block-diagonal
mask.  That work grows with the step's rows times all its keys, most of it masked: a step with
a 256-row prompt chunk and eight decode rows computes scores of the chunk against the decode
requests' keys and of each decode row against the chunk's, to throw them away.

:func:`use_segment_attention` switches a shard's layers (CPU only: an accelerator prefers one
large kernel to many small ones) to ``SEGMENTS``, the attention function registered here in
transformers' ``AttentionInterface``.  While a packed step runs a layer (:func:`running`), each
segment's rows attend to their own request's keys alone, through their own block of the step's
mask (a view), with transformers' SDPA function (grouped heads, scaling and every keyword the
layer passes handled as before), and the rows are joined in packed order: the packed
attention's result without the masked blocks.

Where a segment's keys come from:

* unjoined cache (:class:`~worker_core.kv_cache.PackedCache` ``unjoined``): the views of each
  request's positions ``[0, start + length)`` its cache kept for this layer, never joined; a
  request that starts from a chain of cached prefixes (a conversation's turns) gives them in
  pieces, attended piece by piece and merged by their log-sum-exp (torch's CPU flash kernel
  returns it), so no step copies a conversation's history.  The
  keys the layer passes must be the very tensor the cache's update returned (``KeysChanged``
  otherwise: a layer that transforms cached keys, e.g. DeepSeek's latent expansion, cannot be
  split; :func:`keys_as_cached` probes a shard once);
* otherwise: the layer's keys and values cut along the packed layout (each segment's
  ``start + length`` positions in segment order), whatever the layer did to them after the
  cache (views, no copy beyond the cache's join).

Outside a packed step (nothing running on this thread), or a step of one segment, it is
transformers' SDPA function with what it is given.  Keys of another length than the running
step's layout raise ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kv_cache import PackedCache

SEGMENTS = "molink_segments"  # the attention implementation's name in transformers' registry

_state = threading.local()  # .cache: the PackedCache of the step whose layer runs on this thread


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    cache: PackedCache | None = getattr(_state, "cache", None)
    if cache is None or (len(cache.segments) == 1 and not cache.unjoined):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if cache.unjoined:
        layer, views, returned = cache.current
        if key is not returned or layer != getattr(module, "layer_idx", layer):
            raise KeysChanged(f"layer {getattr(module, 'layer_idx', '?')} attends to other keys than its cache's")
    else:
        keys = sum(s.start + s.length for s in cache.segments)
        if key.shape[2] != keys or query.shape[2] != sum(s.length for s in cache.segments):
            raise RuntimeError(f"{key.shape[2]} keys for a packed step laid out over {keys}")
        views = []
        k0 = 0
        for seg in cache.segments:
            end = k0 + seg.start + seg.length
            views.append(([key[0, :, k0:end]], [value[0, :, k0:end]]))
            k0 = end
    outs = []
    q0 = k0 = 0
    for seg, (ks, vs) in zip(cache.segments, views):
        n, total = seg.length, seg.start + seg.length
        q = query[:, :, q0 : q0 + n]
        mask = attention_mask[:, :, q0 : q0 + n, k0 : k0 + total] if attention_mask is not None else None
        if len(ks) > 1 and _FLASH is not None and not any(kwargs.get(x) is not None for x in UNMERGEABLE):
            outs.append(_merged(q, ks, vs, mask, scaling))
        else:
            k, v = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, dim=1), torch.cat(vs, dim=1))
            if n == 1 and mask is not None and not mask.any():
                mask = None  # a decode row that sees every key: the unmasked path (grouped heads folded)
            out, _ = sdpa_attention_forward(module, q, k.unsqueeze(0), v.unsqueeze(0), mask, dropout, scaling, **kwargs)
            outs.append(out)  # [1, n, heads, d]
        q0 += n
        k0 += total
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


# keywords of a layer's attention call that change the scores beyond a mask: such a layer's pieces
# are joined and attended by transformers' function
UNMERGEABLE = ("softcap", "s_aux", "position_bias")
# torch's CPU flash kernel, which returns each row's log-sum-exp (a private op: where a torch lacks
# it, pieces are joined)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _merged(
    q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], mask: torch.Tensor | None, scaling: float | None
) -> torch.Tensor:
    """Rows ``q`` ([1, heads, n, d]) attending to keys and values given in pieces along the
    positions ([kv_heads, len_i, d] each, in order) under ``mask`` ([1, 1, n, sum len_i] or
    None), without joining them: each piece attended on its own by torch's CPU flash kernel,
    which gives the log-sum-exp of each row's scores, and the pieces' outputs weighed by the
    softmax of those.  [1, n, heads, d], as transformers' attention functions return it."""
    assert _FLASH is not None  # the caller checks
    outs, lses = [], []
    a = 0
    for k, v in zip(ks, vs):
        b = a + k.shape[1]
        m = mask[..., a:b] if mask is not None else None
        out, lse = _FLASH(q, k.unsqueeze(0), v.unsqueeze(0), 0.0, False, attn_mask=m, scale=scaling)
        outs.append(out.float())
        lses.append(lse.float())
        a = b
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)  # [pieces, 1, heads, n, 1]
    joined = (torch.stack(outs) * weights).sum(dim=0)
    return joined.to(q.dtype).transpose(1, 2)


class KeysChanged(RuntimeError):
    """A layer attended to other keys than those its unjoined cache returned."""


AttentionInterface.register(SEGMENTS, segment_attention)


def use_segment_attention(config: Any, device: torch.device) -> bool:
    """Switch a CPU shard whose layers attend with SDPA to :func:`segment_attention` (the
    shard's own config: its layers read the name at every call).  True when switched."""
    if device.type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    config._attn_implementation = SEGMENTS
    return True


def keys_as_cached(step: Callable[[], object]) -> bool:
    """Run ``step`` (a packed step of two segments on an unjoined cache, on scratch buffers): True
    when every layer attended to the keys as its cache returned them, False on ``KeysChanged``."""
    try:
        step()
    except KeysChanged:
        return False
    return True


@contextlib.contextmanager
def running(cache: PackedCache) -> Iterator[None]:
    """The packed step whose layers run on this thread now."""
    _state.cache = cache
    try:
        yield
    finally:
        _state.cache = None
