"""Load one contiguous range of decoder layers of a Hugging Face checkpoint, and nothing more.

Contract
--------
``load_shard(folder, start, end, device, dtype)`` returns a :class:`Shard` holding decoder
layers ``[start, end)`` (renumbered from 0, so each shard has its own cache indices), the input
embeddings when ``start == 0``, the final norm and LM head when ``end == num_layers``, and the
rotary embedding.  The skeleton is built on the ``meta`` device and only the tensors of the
range are read from the safetensors files (``safe_open``), so a stage's memory is its share of
the checkpoint.  A GGUF model's folder (:mod:`worker_core.gguf_source`: a tensor table over a
GGUF file or over delivered blocks) is read through the same seam (:func:`_tensor_reader`): each
tensor of the range is read and dequantized alone, then cast and quantized like any other.
Tied embeddings (no ``lm_head.weight`` in the file) are read from the input embedding's tensor.
Any tensor the range needs but the checkpoint lacks is a clear :class:`ShardError`.  The model's
own classes (from ``transformers``) do the maths.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import checkpoint_keys, gguf_source
from .precision import kept_in_int8
from .quantize import Precision, module_bytes, quantize_layer

log = logging.getLogger("molink.shard")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ShardError(Exception):
    """The checkpoint cannot provide the requested layer range."""


@dataclass
class Shard:
    config: Any  # transformers PretrainedConfig of the whole model (family-specific attributes)
    layer_start: int
    layer_end: int
    num_layers: int
    embed: nn.Module | None  # first stage only
    pos_embed: nn.Module | None  # first stage, families with learned positions (GPT-2 wpe)
    embed_norm: nn.Module | None  # first stage, families that normalise embeddings (Bloom)
    layers: nn.ModuleList  # local index i is global layer layer_start + i
    windows: list[int | None]  # sliding window of each local layer (None: full attention)
    layer_types: list[str | None]  # config.layer_types of each local layer, where the family has them
    rotary: nn.Module | None
    norm: nn.Module | None  # last stage only
    lm_head: nn.Module | None  # last stage only
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int  # bytes the stage's weights take (quantized layers at their stored size)
    precision: Precision = Precision.NONE  # how the decoder layers are stored
    # do its layers attend to the keys their cache returns, untouched (None: not probed yet)?
    # Then a CPU stage's packed steps join no keys (worker_core.segment_attention)
    keys_as_cached: bool | None = None

    @functools.cached_property
    def layer_args(self) -> frozenset[str]:
        """Keyword names the decoder layers take (the cache is ``cache`` or ``layer_past``;
        ALiBi families take ``alibi``)."""
        return frozenset(inspect.signature(self.layers[0].forward).parameters) if len(self.layers) else frozenset()

    @functools.cached_property
    def rotary_per_layer_type(self) -> bool:
        """The rotary embedding takes the layer type (Gemma 3's local/global frequencies)."""
        return self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_end == self.num_layers

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name of a safetensors checkpoint (single file or sharded), or of a GGUF
    model's folder, to its file."""
    gguf = _gguf(folder)
    if gguf is not None:
        return {name: t.file for name, t in gguf.tensors.items()}
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / fname for name, fname in weight_map.items()}
    single = folder / WEIGHTS_NAME
    if not single.exists():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise ShardError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (found: {', '.join(found[:10]) or 'nothing'})")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open is no dict (no __iter__)


def _gguf(folder: Path) -> gguf_source.GgufCheckpoint | None:
    try:
        return gguf_source.open_folder(folder)
    except gguf_source.GgufError as e:
        raise ShardError(str(e)) from None


def _tensor_reader(folder: Path, files: dict[str, Path], stack: ExitStack) -> Any:  # Callable[[str], Tensor]
    """``read(name)`` -> one checkpoint tensor on the CPU: from the safetensors files, or read and
    dequantized (float32) from a GGUF model's blocks."""
    gguf = _gguf(folder)
    if gguf is not None:
        return gguf.load
    handles: dict[Path, Any] = {}

    def read(key: str) -> torch.Tensor:
        path = files[key]
        if path not in handles:
            handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        return handles[path].get_tensor(key)

    return read


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``, by name, on the CPU (a whole small model:
    a draft model's; stages read their range a layer at a time instead)."""
    files = checkpoint_files(folder)
    with ExitStack() as stack:
        read = _tensor_reader(folder, files, stack)
        return {name: read(name) for name in files}


def load_config(folder: Path) -> Any:  # a transformers PretrainedConfig
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    # SDPA takes our packed block-diagonal mask; attention soft-capping (Gemma 2) needs eager
    config._attn_implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    return config


def _decoder(model: nn.Module) -> tuple[nn.Module, str, str]:
    """The base model, its attribute path, and the attribute name of its layer list."""
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    if base is None:
        raise ShardError(f"{type(model).__name__}: no base model at {prefix!r}")
    config: Any = model.config  # a transformers config (torch types Module attributes as tensors or modules)
    n = config.num_hidden_layers
    for attr in ("layers", "h", "blocks"):
        lst = getattr(base, attr, None)
        if isinstance(lst, nn.ModuleList) and len(lst) == n:
            return base, prefix, attr
    raise ShardError(f"{type(model).__name__}: cannot find its list of {n} decoder layers")


def _layer_window(config: Any, layer: nn.Module, global_idx: int) -> int | None:
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "sliding_window"):
        return attn.sliding_window
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if layer_types[global_idx] == "sliding_attention" else None
    return window


@dataclass
class _Skeleton:
    """A range's model on ``meta`` and the checkpoint tensors that fill it."""

    config: Any
    model: nn.Module
    base: nn.Module
    kept: nn.ModuleList
    windows: list[int | None]
    layer_types: list[str | None]
    embed: nn.Module
    pos_embed: nn.Module | None
    embed_norm: nn.Module | None
    norm: nn.Module | None
    head: nn.Module | None
    num_layers: int
    plan: dict[str, tuple[str, list[str]]]  # local parameter -> (how to build it, checkpoint keys)
    layers_prefix: str  # local parameter names of decoder layer i start with f"{layers_prefix}{i}."


def _skeleton(
    config: Any, names: set[str] | dict, start: int, end: int, dtype: torch.dtype, where: object
) -> _Skeleton:
    from transformers import AutoModelForCausalLM

    num_layers = int(config.num_hidden_layers)
    if not 0 <= start < end <= num_layers:
        raise ShardError(f"layer range [{start}, {end}) outside a model of {num_layers} layers")
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:  # the family has no SDPA path (e.g. Bloom): its eager attention takes the mask too
            if "scaled_dot_product_attention" not in str(e):
                raise
            config._attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    base, prefix, layers_attr = _decoder(model)
    all_layers = getattr(base, layers_attr)
    windows = [_layer_window(config, all_layers[g], g) for g in range(start, end)]
    types = getattr(config, "layer_types", None)
    layer_types = [types[g] if types else None for g in range(start, end)]
    kept = nn.ModuleList(all_layers[start:end])
    for local, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                setattr(m, "layer_idx", local)  # noqa: B010 - torch types Module.__setattr__ for tensors and modules
    setattr(base, layers_attr, kept)

    is_first, is_last = start == 0, end == num_layers
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    norm_attr = next(
        (a for a in ("norm", "final_layernorm", "ln_f", "norm_f") if getattr(base, a, None) is not None), None
    )
    norm = getattr(base, norm_attr) if norm_attr else None
    pos_embed = getattr(base, "wpe", None)
    embed_norm = getattr(base, "word_embeddings_layernorm", None)
    if not is_first:
        _detach(model, embed_name)
        if pos_embed is not None:
            _detach(model, f"{prefix}.wpe")
        if embed_norm is not None:
            _detach(model, f"{prefix}.word_embeddings_layernorm")
    if not is_last:
        if head_name:
            _detach(model, head_name)
        if norm is not None:
            _detach(model, f"{prefix}.{norm_attr}")

    # Which checkpoint tensors fill which local parameter.
    layer_re = re.compile(rf"^{re.escape(prefix)}\.{layers_attr}\.(\d+)\.(.*)$")
    plan: dict[str, tuple[str, list[str]]] = {}
    missing: list[str] = []
    for local_name in model.state_dict():
        m = layer_re.match(local_name)
        name = f"{prefix}.{layers_attr}.{int(m.group(1)) + start}.{m.group(2)}" if m else local_name
        if head_name and local_name == f"{head_name}.weight" and name not in names:
            name = f"{embed_name}.weight"  # tied embeddings
        found = checkpoint_keys.sources(name, names)
        if found is None:
            missing.append(name)
        else:
            plan[local_name] = found
    if missing:
        raise ShardError(
            f"checkpoint {where} lacks {len(missing)} tensors of layers [{start}, {end}), e.g. {missing[:3]}"
        )
    return _Skeleton(
        config,
        model,
        base,
        kept,
        windows,
        layer_types,
        embed,
        pos_embed,
        embed_norm,
        norm,
        head,
        num_layers,
        plan,
        f"{prefix}.{layers_attr}.",
    )


def needed_tensors(folder: Path, start: int, end: int) -> list[str]:
    """Names of the checkpoint tensors that layers ``[start, end)`` read (headers only)."""
    sk = _skeleton(load_config(folder), checkpoint_files(folder), start, end, torch.float32, folder)
    return sorted({k for _, keys in sk.plan.values() for k in keys})


# transformers' switch (read at every attention call) that hands grouped-query attention to torch's SDPA
# as it is (``enable_gqa``) even where a mask is given
FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def grouped_attention_on(device: torch.device) -> None:
    """On a CPU, let torch's SDPA attend with the key/value heads as they are: otherwise, given a
    mask (every packed step has one), transformers first copies every key and value head once per
    query group (``repeat_kv``), the whole cache of the step's requests, at every layer of every
    step.  torch's CPU flash kernel takes the mask with grouped heads: the default model's shapes
    (9 query heads, 3 key/value heads, 25 queries over 3,081 keys) 3.5 -> 2.1 ms a layer, the same
    output.  Not on accelerators: their fast kernels take no mask with grouped heads (transformers
    then chooses as it does).  The switch is the process's: a worker serves one device."""
    if device.type == "cpu":
        os.environ[FORCE_GQA] = "1"


def load_shard(
    folder: Path,
    start: int,
    end: int,
    device: torch.device,
    dtype: torch.dtype,
    precision: Precision = Precision.NONE,
) -> Shard:
    grouped_attention_on(device)
    files = checkpoint_files(folder)
    sk = _skeleton(load_config(folder), files, start, end, dtype, folder)
    config, model, base, plan, num_layers = sk.config, sk.model, sk.base, sk.plan, sk.num_layers
    is_first, is_last = start == 0, end == num_layers
    if precision is not Precision.NONE and getattr(config, "_experts_implementation", None) not in (None, "eager"):
        config._experts_implementation = "eager"  # quantized experts are read one expert at a time

    # Parameters grouped by decoder layer (local index) and the rest (embeddings, norm, head):
    # one layer is read, built, quantized and placed at a time, so the full-precision copy
    # of only one layer exists at once.
    layer_re = re.compile(rf"^{re.escape(sk.layers_prefix)}(\d+)\.(.*)$")
    per_layer: dict[int, dict[str, tuple[str, list[str]]]] = {}
    rest: dict[str, tuple[str, list[str]]] = {}
    for local_name, how in plan.items():
        m = layer_re.match(local_name)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = how
        else:
            rest[local_name] = how
    weight_bytes = 0
    with ExitStack() as stack:
        read_one = _tensor_reader(folder, files, stack)

        def read(keys: list[str]) -> list[torch.Tensor]:
            return [read_one(key) for key in keys]

        for local, layer in enumerate(sk.kept):
            # full precision is built on the CPU; quantize_layer moves (and on CUDA quantizes) it
            state = {
                name: checkpoint_keys.build(kind, read(keys)).to(dtype=dtype)
                for name, (kind, keys) in per_layer.get(local, {}).items()
            }
            layer.load_state_dict(state, strict=True, assign=True)
            del state
            quantize_layer(layer, precision, device, dtype)
            weight_bytes += module_bytes(layer)
        state = {
            local_name: checkpoint_keys.build(kind, read(keys)).to(device=device, dtype=dtype)
            for local_name, (kind, keys) in rest.items()
        }
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ShardError(f"{type(model).__name__}: unexpected tensors {result.unexpected_keys[:5]}")
    weight_bytes += sum(t.numel() * t.element_size() for t in state.values())
    del state

    _materialize_buffers(model, device)
    from .segment_attention import use_segment_attention  # transformers' attention stack: only where layers are built

    use_segment_attention(config, device)
    rotary = getattr(base, "rotary_emb", None)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise ShardError(f"{type(model).__name__}: tensors left unloaded: {leftovers[:5]}")
    log.info(
        "loaded layers [%d, %d) of %d from %s at %s: %.1f MB",
        start,
        end,
        num_layers,
        folder,
        precision.value,
        weight_bytes / 1e6,
    )
    return Shard(
        config=config,
        layer_start=start,
        layer_end=end,
        num_layers=num_layers,
        embed=sk.embed if is_first else None,
        pos_embed=sk.pos_embed if is_first else None,
        embed_norm=sk.embed_norm if is_first else None,
        layers=sk.kept,
        windows=sk.windows,
        layer_types=sk.layer_types,
        rotary=rotary,
        norm=sk.norm if is_last else None,
        lm_head=sk.head if is_last else None,
        device=device,
        dtype=dtype,
        weight_bytes=weight_bytes,
        precision=precision,
    )


def carve(whole: Shard, start: int, end: int) -> Shard:
    """The stage of layers ``[start, end)`` taken from a loaded shard that holds them (a standby
    member's whole model or span, see :mod:`master_core.standby`; a stage's old, wider range in a
    re-plan; or the layers a stage took over from a lost neighbour, which it computes apart at
    first): its modules shared, nothing read again.  Raises :class:`ShardError` unless ``whole``
    holds every layer of the range."""
    if not whole.layer_start <= start < end <= whole.layer_end:
        raise ShardError(
            f"cannot take layers [{start}, {end}) from a shard of [{whole.layer_start}, {whole.layer_end})"
        )
    first, last = start == 0, end == whole.num_layers
    layers = nn.ModuleList(whole.layers[start - whole.layer_start : end - whole.layer_start])
    kept = [m for m in (whole.embed, whole.pos_embed, whole.embed_norm) if first and m is not None]
    kept += [m for m in (whole.norm, whole.lm_head) if last and m is not None]
    return Shard(
        config=whole.config,
        layer_start=start,
        layer_end=end,
        num_layers=whole.num_layers,
        embed=whole.embed if first else None,
        pos_embed=whole.pos_embed if first else None,
        embed_norm=whole.embed_norm if first else None,
        layers=layers,
        windows=whole.windows[start - whole.layer_start : end - whole.layer_start],
        layer_types=whole.layer_types[start - whole.layer_start : end - whole.layer_start],
        rotary=whole.rotary,
        norm=whole.norm if last else None,
        lm_head=whole.lm_head if last else None,
        device=whole.device,
        dtype=whole.dtype,
        weight_bytes=sum(module_bytes(m) for m in [*layers, *kept]),
        precision=whole.precision,
        keys_as_cached=whole.keys_as_cached,
    )


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Give the non-persistent buffers (rotary frequencies, embedding scales ...) their values.

    They are not in checkpoints, so they are still on ``meta``.  The model's own
    ``_init_weights`` knows how to fill them; it is run on each such module with the module's
    loaded parameters swapped out for meta stand-ins, so they cannot be touched."""
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        stand_ins = {k: b for k, b in module._buffers.items() if b is not None and b.is_meta}
        if not stand_ins:
            continue
        meta = list(stand_ins)
        for k, b in stand_ins.items():
            module._buffers[k] = torch.empty(b.shape, dtype=b.dtype, device=device)
        params = dict(module._parameters)
        for k, p in params.items():
            if p is not None:
                module._parameters[k] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False
                )
        try:
            if init is None:
                raise ShardError(f"{type(model).__name__} cannot initialise {type(module).__name__}'s buffers {meta}")
            init(module)
        finally:
            module._parameters.update(params)


def _detach(model: nn.Module, dotted: str) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, None)


def parameter_counts(folder: Path) -> tuple[list[int], int, int, list[int]]:
    """(parameters of each decoder layer, of the input embeddings, of the LM head, of each decoder
    layer's matrices that ``int4`` keeps in int8) from the checkpoint's headers only (no tensor is
    read).  A tied head counts as the embeddings."""
    files = checkpoint_files(folder)
    gguf = _gguf(folder)
    layer_re = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
    per_layer: dict[int, int] = {}
    kept: dict[int, int] = {}
    embed = head = other = 0
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    if gguf is not None:
        shapes = {name: t.shape for name, t in gguf.tensors.items()}
    else:
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in names})
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        m = layer_re.search(name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + n
            kept[int(m.group(1))] = kept.get(int(m.group(1)), 0) + (n if kept_in_int8(name) else 0)
        elif "embed" in name or name.endswith(("wte.weight", "word_embeddings.weight")):
            embed += n
        elif "lm_head" in name:
            head += n
        else:
            other += n
    layers = [per_layer[i] for i in sorted(per_layer)]
    return layers, embed + other, head or embed, [kept[i] for i in sorted(per_layer)]


def join(kept: Shard, added: Shard) -> Shard:
    """The stage made of a loaded shard ``kept`` and an adjacent one ``added`` of the same model
    (a stage taking over its lost neighbour's layers, see :meth:`master_core.group.Group`): their
    modules shared, nothing read again.  The caches ``kept`` wrote stay valid: its layers keep
    their cache indices (``layer_idx``) and ``added``'s layers are given unused ones.  Raises
    :class:`ShardError` unless the two are adjacent."""
    adjacent = kept.layer_end == added.layer_start or added.layer_end == kept.layer_start
    if kept.num_layers != added.num_layers or not adjacent:
        raise ShardError(
            f"cannot join layers [{added.layer_start}, {added.layer_end}) to [{kept.layer_start}, {kept.layer_end})"
        )
    used = {cache_index(layer) for layer in kept.layers}
    free = (i for i in range(kept.num_layers) if i not in used)
    for layer in added.layers:
        index = next(free)
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                setattr(m, "layer_idx", index)  # noqa: B010 - torch types Module.__setattr__ for tensors and modules
    low, high = (kept, added) if added.layer_start == kept.layer_end else (added, kept)
    return Shard(
        config=low.config,
        layer_start=low.layer_start,
        layer_end=high.layer_end,
        num_layers=low.num_layers,
        embed=low.embed,
        pos_embed=low.pos_embed,
        embed_norm=low.embed_norm,
        layers=nn.ModuleList([*low.layers, *high.layers]),
        windows=[*low.windows, *high.windows],
        layer_types=[*low.layer_types, *high.layer_types],
        rotary=low.rotary if low.rotary is not None else high.rotary,
        norm=high.norm,
        lm_head=high.lm_head,
        device=low.device,
        dtype=low.dtype,
        weight_bytes=low.weight_bytes + high.weight_bytes,
        precision=low.precision,
        keys_as_cached=low.keys_as_cached,
    )


def cache_index(layer: nn.Module) -> int | None:
    """The index a decoder layer's attention writes its cache under (``layer_idx``)."""
    for m in layer.modules():
        index = getattr(m, "layer_idx", None)
        if isinstance(index, int):
            return index
    return None
