"""A GGUF file seen as a checkpoint: its tensors by Hugging Face name, read and dequantized one at a time.

Contract
--------
``write_folder(gguf, out)`` makes ``out`` a small model folder for a GGUF file: ``config.json``,
``generation_config.json`` and the tokenizer files (all from the file's metadata, through
transformers) and :data:`SIDECAR`, the tensor table: for every Hugging Face tensor name, its GGUF
name, GGML type, logical (torch-order) shape, and where its raw blocks lie (the GGUF file's
absolute path, byte offset, byte length; the file's size is recorded and checked on every open).
No weight is copied.  Only the file's header and tensor table are read (``gguf.GGUFReader``
memory-maps the file).  ``config.json`` also names the GGUF architecture (``gguf_architecture``),
which picks the per-architecture tensor post-processing, so a folder of delivered blocks (see
:func:`write_table`, used by the worker's weight cache) is read the same way.

``open_folder(folder)`` returns a :class:`GgufCheckpoint` for such a folder (None for any other
folder).  ``GgufCheckpoint.load(name)`` reads that one tensor's blocks and returns it dequantized to
float32: ``gguf.quants.dequantize`` row chunk by row chunk, then transformers' tensor processor of
the architecture (``TENSOR_PROCESSORS``, e.g. llama's q/k head permutation), giving exactly the
tensor ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` gives for that name.

Supported: the GGML types of :data:`worker_core.wire.GGUF_TYPES` (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q2_K .. Q6_K; a Q4_K_M file holds Q4_K and Q6_K); the architectures whose transformers
processing maps one GGUF tensor to one model tensor (llama and its GGUF family: mistral, qwen2,
qwen3, phi3, gemma/gemma2/gemma3, nemotron, stablelm, starcoder2 ...).  MoE files whose experts
transformers merges or splits (qwen2moe, qwen3moe, gpt-oss, minimax-m2), gpt2 (its LM head is
special-cased), mamba/lfm2/t5 and the architectures transformers reads through its newer GGUF
path are refused with :class:`GgufError` naming the architecture; any other GGML type is a
:class:`GgufError` naming the type.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .wire import GGUF_TYPES, gguf_nbytes

log = logging.getLogger("molink.gguf")

SIDECAR = "gguf.json"
TABLE_FORMAT = 1
ARCH_KEY = "gguf_architecture"  # config.json key naming the GGUF architecture
_CHUNK_ELEMENTS = 1 << 22  # dequantize at most this many values at once (16 MB of float32)
# transformers' per-architecture processors that map one GGUF tensor to one model tensor
_ONE_TO_ONE = frozenset({"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor"})


class GgufError(ValueError):
    """The GGUF file (or its folder) cannot be served as a checkpoint."""


@dataclass(frozen=True)
class GgufTensor:
    """One tensor: where its raw blocks lie and how to turn them into the model's tensor."""

    name: str  # Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
    gguf_name: str  # e.g. "blk.0.attn_q.weight"
    ggml_type: str  # one of wire.GGUF_TYPES
    shape: tuple[int, ...]  # logical, torch order
    file: Path
    offset: int  # of the first byte of the blocks in ``file``
    nbytes: int


@dataclass(frozen=True)
class GgufCheckpoint:
    architecture: str
    config: Any  # transformers PretrainedConfig
    tensors: dict[str, GgufTensor]

    def read_raw(self, name: str) -> np.ndarray:
        """The raw blocks of ``name``: uint8 [nbytes]."""
        t = self.tensors[name]
        raw = np.fromfile(t.file, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        if raw.size != t.nbytes:
            raise GgufError(f"{t.file} ends inside tensor {t.gguf_name}: damaged or truncated")
        return raw

    def load(self, name: str) -> torch.Tensor:
        """``name`` dequantized to float32, as transformers gives it."""
        t = self.tensors[name]
        return dequantize(self.read_raw(name), t.ggml_type, t.shape, t.gguf_name, self.architecture, self.config)


# ------------------------------------------------------------------ pure pieces


def _qtype(ggml_type: str) -> Any:  # a gguf.GGMLQuantizationType
    import gguf

    if ggml_type not in GGUF_TYPES:
        raise GgufError(f"GGML tensor type {ggml_type} is not supported (supported: {', '.join(GGUF_TYPES)})")
    qtype = gguf.GGMLQuantizationType[ggml_type]
    if tuple(gguf.GGML_QUANT_SIZES[qtype]) != GGUF_TYPES[ggml_type]:  # the wire's table must agree with gguf's
        raise GgufError(f"block size of {ggml_type} differs between gguf and worker_core.wire")
    return qtype


def _processor(architecture: str, config: Any) -> Any:  # a transformers TensorProcessor
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_SUPPORTED_ARCHITECTURES,
        TENSOR_PROCESSORS,
        TensorProcessor,
    )

    if architecture in GGUF_ARCHS:
        raise GgufError(f"GGUF architecture {architecture!r} is read by transformers' packed-GGUF path; not supported")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and config.model_type not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GgufError(f"transformers cannot read GGUF architecture {architecture!r}")
    cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if cls.__name__ not in _ONE_TO_ONE:
        raise GgufError(
            f"GGUF architecture {architecture!r} is not supported: transformers merges or reshapes its tensors "
            f"({cls.__name__}), so they cannot be read one at a time"
        )
    return cls(config=config.to_dict())


@functools.lru_cache(maxsize=8)
def _gguf_names(config_json: str, architecture: str) -> dict[str, str]:
    """Hugging Face name -> GGUF name, from transformers' own map over a meta-device skeleton."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    to_hf = get_gguf_hf_weights_map(model, _processor(architecture, config))
    out: dict[str, str] = {}
    for gguf_name, hf_name in to_hf.items():
        if hf_name in out:
            raise GgufError(f"GGUF architecture {architecture!r}: {hf_name} is made of several GGUF tensors")
        out[hf_name] = gguf_name
    return out


def gguf_names(config: Any, architecture: str) -> dict[str, str]:
    return _gguf_names(config.to_json_string(use_diff=False), architecture)


def dequantize(
    raw: np.ndarray, ggml_type: str, shape: tuple[int, ...], gguf_name: str, architecture: str, config: Any
) -> torch.Tensor:
    """One tensor's raw blocks (uint8 [nbytes]) -> the model's float32 tensor of ``shape``."""
    from gguf.quants import dequantize as gguf_dequantize

    qtype = _qtype(ggml_type)
    if raw.size != gguf_nbytes(ggml_type, shape):
        raise GgufError(f"{gguf_name}: {raw.size} bytes do not hold a {ggml_type} tensor of shape {list(shape)}")
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    blocks = raw.reshape(rows, raw.size // rows)
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // cols)  # row chunks: the transient is a chunk, not a second whole tensor
    for r in range(0, rows, step):
        out[r : r + step] = gguf_dequantize(blocks[r : r + step], qtype)
    result = _processor(architecture, config).process(weights=out.reshape(shape), name=gguf_name)
    if result.name != gguf_name or tuple(result.weights.shape) != tuple(shape):
        raise GgufError(f"GGUF architecture {architecture!r}: {gguf_name} is not a one-to-one tensor")
    return torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))


# ------------------------------------------------------------------ folders


def read_header(gguf: Path) -> tuple[str, list[tuple[str, str, tuple[int, ...], int, int]]]:
    """(architecture, [(GGUF name, GGML type name, torch-order shape, file offset, byte length)])."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
        architecture = str(reader.fields["general.architecture"].contents())
    except GgufError:
        raise
    except Exception as e:  # a foreign or damaged file: numpy/struct errors of every kind
        raise GgufError(f"cannot read this GGUF file: {type(e).__name__}: {e}") from None
    table = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        table.append((t.name, t.tensor_type.name, shape, int(t.data_offset), int(t.n_bytes)))
    return architecture, table


def write_folder(gguf: Path, out: Path) -> None:
    """Make ``out`` (a new folder) the small model folder of ``gguf``; see the module contract."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    architecture, table = read_header(gguf)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # workers dequantize the blocks themselves
    config.dtype = torch.float32
    setattr(config, ARCH_KEY, architecture)
    names = gguf_names(config, architecture)
    to_hf = {g: h for h, g in names.items()}
    entries: dict[str, dict] = {}
    for gguf_name, ggml_type, shape, offset, nbytes in table:
        hf_name = to_hf.get(gguf_name)
        if hf_name is None:
            log.info("%s: tensor %s has no model parameter; ignored (as transformers does)", gguf.name, gguf_name)
            continue
        if ggml_type not in GGUF_TYPES:
            raise GgufError(
                f"{gguf.name}: tensor {gguf_name} is stored as {ggml_type}, which MoLink cannot read "
                f"(supported: {', '.join(GGUF_TYPES)})"
            )
        if gguf_nbytes(ggml_type, shape) != nbytes:
            raise GgufError(f"{gguf.name}: tensor {gguf_name} has {nbytes} bytes, not a {ggml_type} {list(shape)}")
        entries[hf_name] = {"file": str(gguf), "offset": offset, "nbytes": nbytes, "type": ggml_type, "shape": shape}
    if gguf.stat().st_size < max((e["offset"] + e["nbytes"] for e in entries.values()), default=0):
        raise GgufError(f"{gguf}: the file is shorter than its tensor table says (truncated)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        log.warning("%s carries no chat template: /v1/chat/completions will refuse requests", gguf.name)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_sidecar(out, architecture, entries, {"path": str(gguf), "size": gguf.stat().st_size})


def write_table(
    folder: Path, config_json: str, entries: dict[str, tuple[Path, int, int, str, tuple[int, ...]]]
) -> None:
    """Make ``folder`` (holding ``config_json``) read its tensors from raw blocks in other files:
    name -> (file, offset, byte length, GGML type, logical shape)."""
    architecture = json.loads(config_json).get(ARCH_KEY)
    if not isinstance(architecture, str):
        raise GgufError(f"the model's config names no GGUF architecture ({ARCH_KEY})")
    table = {
        name: {"file": str(f), "offset": off, "nbytes": n, "type": t, "shape": list(s)}
        for name, (f, off, n, t, s) in entries.items()
    }
    _write_sidecar(folder, architecture, table, None)


def _write_sidecar(folder: Path, architecture: str, table: dict, source: dict | None) -> None:
    body = {"format": TABLE_FORMAT, "architecture": architecture, "source": source, "tensors": table}
    tmp = folder / f".{SIDECAR}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(body))
    tmp.replace(folder / SIDECAR)


def open_folder(folder: Path) -> GgufCheckpoint | None:
    """The GGUF checkpoint of ``folder``, or None when the folder holds no tensor table."""
    side = folder / SIDECAR
    try:
        st = side.stat()
    except OSError:
        return None
    return _open(str(folder.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open(folder_s: str, _mtime: int, _size: int) -> GgufCheckpoint:
    from transformers import AutoConfig

    folder = Path(folder_s)
    try:
        body = json.loads((folder / SIDECAR).read_text())
        if body.get("format") != TABLE_FORMAT:
            raise GgufError(f"{folder / SIDECAR}: unknown format {body.get('format')!r}")
        architecture = str(body["architecture"])
        source = body.get("source")
        raw_table = dict(body["tensors"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GgufError(f"{folder / SIDECAR} is damaged: {type(e).__name__}: {e}") from None
    if source is not None:  # one GGUF file: it must still be the file the table was read from
        path = Path(source["path"])
        try:
            size = path.stat().st_size
        except OSError:
            raise GgufError(f"{path} (the model's GGUF file) is gone; resolve the model again") from None
        if size != source["size"]:
            raise GgufError(f"{path} changed since its table was read; resolve the model again")
    config = AutoConfig.from_pretrained(folder)
    names = gguf_names(config, architecture)
    tensors: dict[str, GgufTensor] = {}
    for name, e in raw_table.items():
        file = Path(e["file"])
        if not file.is_absolute():
            file = folder / file
        shape = tuple(int(d) for d in e["shape"])
        gguf_nbytes(str(e["type"]), shape)  # known type, whole blocks
        gguf_name = names.get(name)
        if gguf_name is None:
            raise GgufError(f"{folder / SIDECAR}: {name} is no parameter of a {architecture} model")
        tensors[name] = GgufTensor(name, gguf_name, str(e["type"]), shape, file, int(e["offset"]), int(e["nbytes"]))
    return GgufCheckpoint(architecture, config, tensors)
