"""Weights delivered over the tunnel: the tensor manifest, the worker's disk cache, the fetcher.

Contract
--------
A model is described to a worker by a manifest: the model's ``config.json`` text and, for
each tensor its layer range needs, a :class:`TensorSpec` (checkpoint name, safetensors dtype,
shape, byte length, SHA-256 of the bytes).  ``WeightCache(root)`` keeps every tensor in its own
one-tensor safetensors file under ``root/tensors``, named by tensor name and content hash, so
a later assignment (another range, a restart) fetches only what is missing: never more than
the range needs, never twice.

``await cache.fetch(specs, request)`` gets the missing tensors, ``window`` chunks of
``CHUNK`` bytes in flight at once over all of them.  ``request(sha256, offset, length)``
returns ``(data, chunk_sha256)``; a chunk whose bytes do not match its hash (or the wrong
length) is asked for again (up to ``CHUNK_RETRIES`` times).  Chunks are written in order to
``<file>.part``, so an interrupted fetch resumes from the verified prefix on disk; a finished
file is checked against the tensor's hash before it is renamed into place (a mismatch removes
it and raises :class:`WeightError`).  ``cache.folder(digest, config_json, specs)`` then writes
a checkpoint folder (``config.json`` + ``model.safetensors.index.json`` pointing at the cached
files) that :func:`worker_core.shard.load_shard` reads like any other.  A GGUF model's tensors
(specs with a ``gguf_type``) are kept as their raw blocks (a one-tensor U8 file whose metadata
names the type and logical shape), and their folder also gets the tensor table of
:mod:`worker_core.gguf_source`, so the shard dequantizes them as it reads them.  ``cache.prune(specs)``
bounds the disk used: the assigned tensors plus at most as many bytes of recently used others.

``read_locations(path)`` parses a safetensors file's header (a local file, never network
bytes): tensor name -> (dtype, shape, first byte, end byte) in the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import gguf_source
from .wire import TensorSpec

log = logging.getLogger("molink.weights")

CHUNK = 1 << 20  # bytes per chunk request
CHUNK_RETRIES = 3


class WeightError(Exception):
    """Weights could not be delivered intact."""


def manifest_digest(config_json: str, specs: list[TensorSpec]) -> str:
    h = hashlib.sha256(config_json.encode())
    for s in sorted(specs, key=lambda s: s.name):
        h.update(f"\n{s.name}\t{s.sha256}".encode())
    return h.hexdigest()


def read_locations(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024 * 1024:
            raise WeightError(f"{path}: safetensors header too large")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), base + begin, base + end)
    return out


def _header(spec: TensorSpec) -> bytes:
    if spec.gguf_type:  # raw GGUF blocks: bytes in the file, their type and logical shape in its metadata
        entry = {"dtype": "U8", "shape": [spec.nbytes], "data_offsets": [0, spec.nbytes]}
        meta = {"gguf_type": spec.gguf_type, "shape": json.dumps(list(spec.shape))}
        body = json.dumps({"__metadata__": meta, spec.name: entry}).encode()
    else:
        entry = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [0, spec.nbytes]}
        body = json.dumps({spec.name: entry}).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


ChunkRequest = Callable[[str, int, int], Awaitable[tuple[bytes, str]]]


class _Download:
    """One tensor being written, chunks in order, hash computed on the way."""

    def __init__(self, spec: TensorSpec, final: Path) -> None:
        self.spec = spec
        self.final = final
        self.part = final.with_name(final.name + ".part")
        header = _header(spec)
        self.hlen = len(header)
        self.hasher = hashlib.sha256()
        done = 0
        if self.part.exists():  # resume from the verified, in-order prefix
            done = max(0, min(self.part.stat().st_size - self.hlen, spec.nbytes)) // CHUNK * CHUNK
            with open(self.part, "rb") as f:
                f.seek(self.hlen)
                left = done
                while left:
                    block = f.read(min(left, 1 << 24))
                    if not block:
                        break
                    self.hasher.update(block)
                    left -= len(block)
        # open while the download runs: finish() or abandon() closes it
        self.file = open(self.part, "r+b" if self.part.exists() else "w+b")  # noqa: SIM115
        self.file.seek(0)
        self.file.write(header)
        self.file.truncate(self.hlen + done)
        self.file.seek(self.hlen + done)
        self.written = done
        self.resumed = done
        self.waiting: dict[int, bytes] = {}  # offset -> verified bytes not yet writable

    def offsets(self) -> list[int]:
        return list(range(self.written, self.spec.nbytes, CHUNK))

    def put(self, offset: int, data: bytes) -> None:
        self.waiting[offset] = data
        while self.written in self.waiting:
            block = self.waiting.pop(self.written)
            self.file.write(block)
            self.hasher.update(block)
            self.written += len(block)

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.hasher.hexdigest() != self.spec.sha256:
            self.part.unlink(missing_ok=True)
            raise WeightError(
                f"tensor {self.spec.name}: bytes do not match the manifest's hash; removed, will fetch again"
            )
        os.replace(self.part, self.final)

    def abandon(self) -> None:
        self.file.flush()
        self.file.close()


class WeightCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tensors = root / "tensors"
        self.models = root / "models"

    def path(self, spec: TensorSpec) -> Path:
        tag = hashlib.sha256(spec.name.encode()).hexdigest()[:16]
        return self.tensors / spec.sha256[:2] / f"{tag}-{spec.sha256}.safetensors"

    def missing(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        return [s for s in specs if not self.path(s).exists()]

    def discard_partial(self, specs: list[TensorSpec]) -> None:
        """Forget partial downloads of ``specs`` (their prefix came from a source whose chunks
        carry no hash, so it must not be resumed as verified)."""
        for s in specs:
            p = self.path(s)
            p.with_name(p.name + ".part").unlink(missing_ok=True)

    async def fetch(self, specs: list[TensorSpec], request: ChunkRequest, window: int = 8) -> int:
        """Fetch what is missing; return the bytes received."""
        todo = self.missing(specs)
        if not todo:
            return 0
        downloads = []
        for spec in todo:
            final = self.path(spec)
            final.parent.mkdir(parents=True, exist_ok=True)
            downloads.append(_Download(spec, final))
        slots = asyncio.Semaphore(window)
        received = 0
        failed = False

        async def one(d: _Download, offset: int) -> None:
            nonlocal received, failed
            length = min(CHUNK, d.spec.nbytes - offset)
            try:
                for attempt in range(CHUNK_RETRIES + 1):
                    data, chunk_sha = await request(d.spec.sha256, offset, length)
                    received += len(data)
                    if len(data) == length and hashlib.sha256(data).hexdigest() == chunk_sha:
                        d.put(offset, data)
                        return
                    log.warning(
                        "chunk %d of %s arrived damaged (attempt %d); asking again",
                        offset // CHUNK,
                        d.spec.name,
                        attempt + 1,
                    )
                raise WeightError(f"chunk {offset // CHUNK} of {d.spec.name} arrived damaged {CHUNK_RETRIES + 1} times")
            except BaseException:
                failed = True
                raise
            finally:
                slots.release()

        tasks: list[asyncio.Task] = []
        try:
            for d in downloads:
                for offset in d.offsets():
                    await slots.acquire()
                    if failed:
                        slots.release()
                        break
                    tasks.append(asyncio.ensure_future(one(d, offset)))
            await asyncio.gather(*tasks)
            for d in downloads:
                d.finish()
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for d in downloads:
                if not d.file.closed:
                    d.abandon()
            raise
        return received

    def prune(self, keep: list[TensorSpec]) -> int:
        """Bound the cache after an assignment: the tensors of ``keep`` stay (and are marked
        used), and of the rest only the most recently used, up to as many bytes as ``keep``
        holds, so a range that moves back and forth is not fetched again each time; older
        tensors, partial downloads and model folders over removed tensors are deleted.
        Returns the bytes freed.  A file the OS will not delete now (open elsewhere) stays."""
        wanted = {self.path(s) for s in keep}
        budget = 0
        others = []
        for f in self.tensors.glob("*/*.safetensors*") if self.tensors.exists() else ():
            try:
                st = f.stat()
            except OSError:
                continue
            if f in wanted:
                os.utime(f)
                budget += st.st_size
            else:
                others.append((st.st_mtime, st.st_size, f))
        freed = 0
        for _, size, f in sorted(others, reverse=True):  # newest first
            if budget >= size and not f.name.endswith(".part"):
                budget -= size
                continue
            try:
                f.unlink()
                freed += size
            except OSError as e:
                log.debug("cannot remove %s now: %s", f, e)
        for index in self.models.glob("*/model.safetensors.index.json") if self.models.exists() else ():
            try:
                paths = json.loads(index.read_text())["weight_map"].values()
                stale = not all((index.parent / p).exists() for p in paths)
            except (OSError, ValueError, KeyError, AttributeError):
                stale = True
            if stale:
                try:
                    for f in index.parent.iterdir():
                        f.unlink(missing_ok=True)
                    index.parent.rmdir()
                except OSError as e:
                    log.debug("cannot remove %s now: %s", index.parent, e)
        if freed:
            log.info("weight cache: freed %.1f MB of tensors no longer assigned", freed / 1e6)
        return freed

    def folder(self, digest: str, config_json: str, specs: list[TensorSpec]) -> Path:
        """A checkpoint folder over the cached tensors of ``specs`` (all must be cached)."""
        folder = self.models / digest
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(config_json)
        weight_map = {s.name: os.path.relpath(self.path(s), folder) for s in specs}
        blocks = [s for s in specs if s.gguf_type]
        if blocks:
            if len(blocks) != len(specs):
                raise WeightError("a manifest mixes GGUF blocks and safetensors tensors")
            table = {s.name: (Path(weight_map[s.name]), len(_header(s)), s.nbytes, s.gguf_type, s.shape) for s in specs}
            gguf_source.write_table(folder, config_json, table)
        else:
            (folder / gguf_source.SIDECAR).unlink(missing_ok=True)
        tmp = folder / "index.tmp"
        tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        tmp.replace(folder / "model.safetensors.index.json")
        return folder
