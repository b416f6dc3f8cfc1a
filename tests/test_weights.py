"""Weight delivery on the worker's side: chunks verified and asked again, resume, final hash."""

import asyncio
import hashlib

import pytest

from worker_core.weights import CHUNK, WeightCache, WeightError, manifest_digest
from worker_core.wire import TensorSpec


def _spec(name: str, data: bytes) -> TensorSpec:
    return TensorSpec(name, "U8", (len(data),), len(data), hashlib.sha256(data).hexdigest())


class Source:
    """Serves chunks of known tensors; can damage chosen chunks or fail after some."""

    def __init__(self, tensors: dict[str, bytes], damage: set | None = None, fail_after: int | None = None) -> None:
        self.by_sha = {hashlib.sha256(d).hexdigest(): d for d in tensors.values()}
        self.damage = set(damage or ())  # (sha, offset) damaged once each
        self.fail_after = fail_after
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, sha: str, offset: int, length: int) -> tuple[bytes, str]:
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise ConnectionError("tunnel dropped")
        self.asked.append((sha, offset))
        data = self.by_sha[sha][offset : offset + length]
        digest = hashlib.sha256(data).hexdigest()
        if (sha, offset) in self.damage:
            self.damage.discard((sha, offset))
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # flipped on the way, after hashing
        await asyncio.sleep(0)
        return data, digest


def _tensors() -> dict[str, bytes]:
    big = bytes(range(256)) * (CHUNK * 3 // 256 + 7)  # 3 chunks and a bit
    return {"model.layers.0.w": big, "model.layers.0.b": b"\x01" * 100, "model.norm.weight": b"\x01" * 100}


def test_damaged_chunk_is_detected_and_fetched_again(tmp_path):
    tensors = _tensors()
    specs = [_spec(n, d) for n, d in tensors.items()]
    big = specs[0]
    src = Source(tensors, damage={(big.sha256, CHUNK)})
    cache = WeightCache(tmp_path)
    asyncio.run(cache.fetch(specs, src, window=3))
    assert src.asked.count((big.sha256, CHUNK)) == 2  # asked again once
    assert src.asked.count((big.sha256, 0)) == 1
    assert cache.missing(specs) == []
    for spec in specs:  # identical content under two names: two files, both right
        from safetensors import safe_open

        with safe_open(str(cache.path(spec)), framework="pt") as f:
            assert f.get_tensor(spec.name).numpy().tobytes() == tensors[spec.name]
    folder = cache.folder(manifest_digest("{}", specs), "{}", specs)
    assert (folder / "config.json").read_text() == "{}"
    # nothing is fetched twice
    again = Source(tensors)
    assert asyncio.run(cache.fetch(specs, again)) == 0 and again.asked == []


def test_interrupted_fetch_resumes_from_verified_prefix(tmp_path):
    tensors = {"w": bytes(range(256)) * (CHUNK * 4 // 256)}
    specs = [_spec("w", tensors["w"])]
    cache = WeightCache(tmp_path)
    with pytest.raises(ConnectionError):
        asyncio.run(cache.fetch(specs, Source(tensors, fail_after=2), window=1))
    assert cache.missing(specs) == specs
    src = Source(tensors)
    received = asyncio.run(cache.fetch(specs, src, window=2))
    assert sorted(o for _, o in src.asked) == [2 * CHUNK, 3 * CHUNK]  # the first two chunks were kept
    assert received == 2 * CHUNK and cache.missing(specs) == []


def test_chunk_damaged_every_time_fails_and_wrong_tensor_hash_is_not_kept(tmp_path):
    tensors = {"w": b"\x07" * 5000}
    spec = _spec("w", tensors["w"])

    class AlwaysBad(Source):
        async def __call__(self, sha, offset, length):
            data, digest = await super().__call__(sha, offset, length)
            return b"\x00" + data[1:], digest

    cache = WeightCache(tmp_path)
    with pytest.raises(WeightError, match="damaged"):
        asyncio.run(cache.fetch([spec], AlwaysBad(tensors)))
    # a manifest whose hash does not match what the master serves: nothing is kept
    lying = TensorSpec("w", "U8", (5000,), 5000, "0" * 64)
    src = Source(tensors)
    src.by_sha["0" * 64] = tensors["w"]
    with pytest.raises(WeightError, match="do not match"):
        asyncio.run(cache.fetch([lying], src))
    final = cache.path(lying)
    assert not final.exists() and not final.with_name(final.name + ".part").exists()


def test_prune_keeps_the_assignment_and_as_much_recent_weight_then_frees_the_rest(tmp_path):
    import os
    import time

    def blob(i: int, n: int) -> bytes:
        return bytes([i]) * n

    layers = {f"model.layers.{i}.w": blob(i, 1000) for i in range(6)}
    specs = {n: _spec(n, d) for n, d in layers.items()}
    cache = WeightCache(tmp_path)
    asyncio.run(cache.fetch(list(specs.values()), Source(layers)))
    old = [specs[f"model.layers.{i}.w"] for i in range(6)]
    for age, spec in enumerate(old):  # layer 0 used last, layer 5 longest ago
        t = time.time() - 100 * (age + 1)
        os.utime(cache.path(spec), (t, t))
    stale_folder = cache.folder("stale", "{}", old)
    (cache.path(old[0]).with_name("junk.safetensors.part")).write_bytes(b"x" * 10)

    keep = old[4:]  # the new assignment: layers 4 and 5
    size = cache.path(old[0]).stat().st_size  # each file: 1000 bytes and its header
    freed = cache.prune(keep)
    left = {s.name for s in old if cache.path(s).exists()}
    # kept: the assignment, and the two most recently used others (0, 1): as many bytes again
    assert left == {"model.layers.0.w", "model.layers.1.w", "model.layers.4.w", "model.layers.5.w"}
    assert freed == 2 * size + 10  # layers 2, 3 and the partial download
    assert not stale_folder.exists()  # its index pointed at removed tensors
    assert cache.missing(keep) == [] and time.time() - cache.path(old[5]).stat().st_mtime < 60  # marked used
    current = cache.folder("current", "{}", keep)
    assert cache.prune(keep) == 0 and current.exists()  # pruning again changes nothing
