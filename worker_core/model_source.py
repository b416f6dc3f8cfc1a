"""Turn a model source string into a local checkpoint folder.

Contract: ``resolve(src)`` accepts
* ``default``: the embedded SmolLM2-135M-Instruct, converted once into the user cache;
* a path to a folder holding ``config.json`` and safetensors weights;
* a path to a ``.gguf`` file: a small folder in the user cache, made once (atomically), holding its
  config, generation config, tokenizer and tensor table but no weights
  (:func:`worker_core.gguf_source.write_folder`): stages read and dequantize only their own tensors
  from the GGUF file, and a master delivers them as the file's quantized blocks.  A damaged or
  foreign file, an unsupported architecture or GGML type is one :class:`ModelSourceError`;
* a Hugging Face hub id ``owner/name``: downloaded (config, tokenizer, safetensors only) with
  ``huggingface_hub`` where the machine is online, or taken from its local hub cache.
It returns an absolute folder path, or raises :class:`ModelSourceError` with one clear line.
``hub_ref(src, folder)`` names the exact hub snapshot (``owner/name@commit``) a hub id resolved to.
``display_name(src, folder)`` is the model id the API reports.
"""

from __future__ import annotations

import re
from pathlib import Path

from .wire import HUB_REF, HUB_REPO

DEFAULT = "default"
_HUB_ID = re.compile(f"^{HUB_REPO}$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


class ModelSourceError(ValueError):
    """The model source cannot be turned into a checkpoint folder."""


def resolve(src: str) -> Path:
    if src == DEFAULT:
        from .default_model import ensure_default_model

        return ensure_default_model()
    path = Path(src).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_folder(path.resolve())
        if path.is_file():
            raise ModelSourceError(
                f"{path}: unsupported model file; give a GGUF file or a checkpoint folder (config.json + safetensors)"
            )
        if not (path / "config.json").exists():
            raise ModelSourceError(f"{path}: not a checkpoint folder (no config.json)")
        return path.resolve()
    if _HUB_ID.match(src):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(src, allow_patterns=_HUB_PATTERNS))
        except Exception as e:  # offline, unknown repo, gated model ...
            raise ModelSourceError(
                f"cannot fetch {src!r} from the hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    raise ModelSourceError(f"{src!r} is neither 'default', an existing folder, nor a hub id like owner/name")


def _gguf_folder(gguf: Path) -> Path:
    """The small folder of a GGUF file (config, tokenizer, tensor table), made once in the cache."""
    import hashlib

    from . import gguf_source
    from .default_model import ensure_converted, gguf_model_dir

    # one folder per file: its path is in the name, since the table points at that path
    where = hashlib.sha256(str(gguf).encode()).hexdigest()[:8]
    base = gguf_model_dir(gguf)
    try:
        return ensure_converted(
            gguf,
            base.with_name(f"{base.name}-{where}"),
            gguf_source.write_folder,
            f"gguf-table-{gguf_source.TABLE_FORMAT}",
        )
    except gguf_source.GgufError as e:
        raise ModelSourceError(f"{gguf}: {e}") from None
    except Exception as e:
        raise ModelSourceError(f"{gguf}: transformers cannot read this GGUF file: {type(e).__name__}: {e}") from None


def hub_ref(src: str, folder: Path) -> str:
    """``owner/name@commit`` when ``folder`` is the hub snapshot ``src`` resolved to, else ""."""
    if not _HUB_ID.match(src) or Path(src).expanduser().exists():
        return ""
    ref = f"{src}@{folder.name}"
    return ref if folder.parent.name == "snapshots" and HUB_REF.match(ref) else ""


def display_name(src: str, folder: Path) -> str:
    if src == DEFAULT:
        from .default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    if _HUB_ID.match(src) and not Path(src).expanduser().exists():
        return src
    return folder.name
