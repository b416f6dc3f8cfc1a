"""The master's side of weight delivery: manifests of layer ranges, and chunks read from disk.

Contract
--------
``WeightSource(folder, hash_cache, hub)`` serves the safetensors checkpoint in ``folder``; with
``hub`` (``owner/name@commit``, the folder being that hub snapshot) every spec also says which
repository file holds the tensor and at what byte offset, so a worker may read it from the hub.
``manifest(start, end)`` (blocking: call it in a thread) returns ``(config_json, specs)`` for
the tensors layers ``[start, end)`` need (see ``worker_core.shard.needed_tensors``), hashing
each tensor once; hashes are remembered in ``hash_cache`` (a JSON file keyed by file path,
size, modification time and tensor name), so a restart does not hash the model again.
A GGUF model's folder (:mod:`worker_core.gguf_source`) is offered as the file's raw blocks:
each spec's ``gguf_type`` names their GGML type, ``shape`` is the logical shape and ``nbytes``
the blocks' length, so a worker receives the quantized bytes, never float32.
``read(sha256, offset, length)`` (blocking) returns ``(bytes, their sha256)`` of a tensor
listed in an earlier manifest; an unknown hash or a range outside the tensor is a
``ValueError`` (the caller treats it as the peer's protocol error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from worker_core import gguf_source
from worker_core.shard import checkpoint_files, needed_tensors
from worker_core.weights import read_locations
from worker_core.wire import TensorSpec

log = logging.getLogger("molink.weight_source")


class WeightSource:
    def __init__(self, folder: Path, hash_cache: Path | None, hub: str = "") -> None:
        self.folder = folder
        self.hash_cache = hash_cache
        self.hub = hub  # "owner/name@commit" when folder is a hub snapshot: specs then say where each tensor lies
        self.config_json = (folder / "config.json").read_text()
        self._where: dict[
            str, tuple[Path, str, tuple[int, ...], int, int]
        ] = {}  # name -> file, dtype, shape, begin, end
        self._gguf_types: dict[str, str] = {}  # name -> GGML type of its blocks (GGUF models only)
        gguf = gguf_source.open_folder(folder)
        if gguf is not None:
            for name, t in gguf.tensors.items():
                self._where[name] = (t.file, "U8", t.shape, t.offset, t.offset + t.nbytes)
                self._gguf_types[name] = t.ggml_type
        else:
            files = checkpoint_files(folder)
            for path in sorted(set(files.values())):
                for name, (dtype, shape, begin, end) in read_locations(path).items():
                    self._where[name] = (path, dtype, shape, begin, end)
        self._by_sha: dict[str, tuple[Path, int, int]] = {}  # sha -> file, begin, end
        self._lock = threading.Lock()
        self._hashes: dict[str, str] = {}
        if hash_cache is not None and hash_cache.exists():
            try:
                self._hashes = dict(json.loads(hash_cache.read_text()))
            except (ValueError, TypeError):
                log.warning("%s is damaged; hashing again", hash_cache)

    def _key(self, name: str) -> str:
        path = self._where[name][0]
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{name}"

    def _sha(self, name: str) -> str:
        key = self._key(name)
        if key in self._hashes:
            return self._hashes[key]
        path, _, _, begin, end = self._where[name]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(begin)
            left = end - begin
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    raise ValueError(f"{path} is shorter than its header says")
                h.update(block)
                left -= len(block)
        self._hashes[key] = h.hexdigest()
        return self._hashes[key]

    def manifest(self, start: int, end: int) -> tuple[str, list[TensorSpec]]:
        names = needed_tensors(self.folder, start, end)
        specs = []
        with self._lock:
            before = len(self._hashes)
            for name in names:
                path, dtype, shape, begin, stop = self._where[name]
                where = {"file": path.relative_to(self.folder).as_posix(), "offset": begin} if self.hub else {}
                gguf_type = self._gguf_types.get(name, "")
                spec = TensorSpec(name, dtype, shape, stop - begin, self._sha(name), gguf_type=gguf_type, **where)
                self._by_sha[spec.sha256] = (path, begin, stop)
                specs.append(spec)
            if self.hash_cache is not None and len(self._hashes) != before:
                tmp = self.hash_cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._hashes))
                tmp.replace(self.hash_cache)
        return self.config_json, specs

    def read(self, sha256: str, offset: int, length: int) -> tuple[bytes, str]:
        where = self._by_sha.get(sha256)
        if where is None:
            raise ValueError(f"no tensor with hash {sha256[:16]} was offered")
        path, begin, end = where
        if offset < 0 or length < 0 or begin + offset + length > end:
            raise ValueError("chunk outside its tensor")
        with open(path, "rb") as f:
            f.seek(begin + offset)
            data = f.read(length)
        return data, hashlib.sha256(data).hexdigest()
