"""Workers read their tensors from a model's hub repository by range requests, else from the master.

The hub is a local aiohttp server shaped like the real one (``/{repo}/resolve/{commit}/{file}``
redirecting to a file server that honours ``Range``), reached through ``huggingface_hub``'s configured endpoint."""

import asyncio

import pytest
from aiohttp import web
from harness import run
from huggingface_hub import constants
from tiny_models import make_tiny_checkpoint

from master_core.weight_source import WeightSource
from worker_core import model_source
from worker_core.hub_ranges import fetch_from_hub
from worker_core.weights import WeightCache

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB = f"tiny/llama@{COMMIT}"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A checkpoint laid out like a hub snapshot in the hub cache."""
    folder = tmp_path_factory.mktemp("hub") / "models--tiny--llama" / "snapshots" / COMMIT
    return make_tiny_checkpoint("llama", folder, num_layers=4, sharded=True)


class FakeHub:
    """Serves ``snapshot``; ``mode``: "ok", "corrupt" (flip a byte of every answer for one file),
    "no-range" (answer 200 with the whole file)."""

    def __init__(self, snapshot, mode="ok", corrupt_file=None):
        self.snapshot, self.mode, self.corrupt_file = snapshot, mode, corrupt_file
        self.ranges: list[tuple[str, str]] = []
        self.whole_files = 0

    async def resolve(self, request):
        assert request.match_info["repo"] == "tiny/llama" and request.match_info["commit"] == COMMIT
        raise web.HTTPFound(f"/cdn/{request.match_info['file']}")  # like the hub: a redirect to its CDN

    async def cdn(self, request):
        name = request.match_info["file"]
        path = self.snapshot / name
        rng = request.headers.get("Range")
        if self.mode == "no-range" or rng is None:
            self.whole_files += 1
            return web.Response(body=path.read_bytes())
        self.ranges.append((name, rng))
        first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        with open(path, "rb") as f:
            f.seek(first)
            data = f.read(last - first + 1)
        if self.mode == "corrupt" and name == self.corrupt_file:
            data = bytes([data[0] ^ 1]) + data[1:]
        return web.Response(
            status=206, body=data, headers={"Content-Range": f"bytes {first}-{last}/{path.stat().st_size}"}
        )

    async def start(self):
        app = web.Application()
        app.add_routes(
            [
                web.get("/{repo:[^/]+/[^/]+}/resolve/{commit}/{file:.+}", self.resolve),
                web.get("/cdn/{file:.+}", self.cdn),
            ]
        )
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def _master(snapshot):
    source = WeightSource(snapshot, None, HUB)
    config_json, specs = source.manifest(2, 4)  # the last stage: layers 2, 3, final norm, head
    asked = []

    async def request(sha, offset, length):
        asked.append(sha)
        return await asyncio.to_thread(source.read, sha, offset, length)

    return specs, request, asked


def _cached_bytes_equal_the_checkpoint(cache, specs, snapshot):
    for s in specs:
        data = cache.path(s).read_bytes()
        with open(snapshot / s.file, "rb") as f:
            f.seek(s.offset)
            assert data.endswith(f.read(s.nbytes))


def test_hub_snapshot_specs_say_where_each_tensor_lies(snapshot):
    assert model_source.hub_ref("tiny/llama", snapshot) == HUB
    assert model_source.hub_ref("tiny/llama", snapshot.parent) == ""  # not a snapshot folder
    specs, _, _ = _master(snapshot)
    files = {s.file for s in specs}
    assert files and all(f.startswith("model-") and f.endswith(".safetensors") for f in files)
    assert not any(".layers.0." in s.name or ".layers.1." in s.name for s in specs)  # only its range


def test_worker_reads_exactly_its_tensors_from_the_hub(snapshot, tmp_path, monkeypatch):
    hub = FakeHub(snapshot)
    specs, master, asked = _master(snapshot)

    async def main():
        monkeypatch.setattr(constants, "ENDPOINT", await hub.start())
        try:
            cache = WeightCache(tmp_path)
            got = await fetch_from_hub(cache, specs, HUB)
            await cache.fetch(specs, master)  # what the hub did not give: nothing here
            return cache, got
        finally:
            await hub.runner.cleanup()

    cache, got = run(main())
    assert got == sum(s.nbytes for s in specs) and asked == [] and hub.whole_files == 0
    assert {name for name, _ in hub.ranges} == {s.file for s in specs}
    _cached_bytes_equal_the_checkpoint(cache, specs, snapshot)


@pytest.mark.parametrize("mode", ["corrupt", "no-range", "offline"])
def test_hub_trouble_falls_back_to_the_master(snapshot, tmp_path, monkeypatch, caplog, mode):
    specs, master, asked = _master(snapshot)
    hub = FakeHub(snapshot, mode, corrupt_file=sorted({s.file for s in specs})[-1])

    async def main():
        endpoint = await hub.start()
        if mode == "offline":
            await hub.runner.cleanup()  # nobody listens there any more
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        try:
            cache = WeightCache(tmp_path)
            got = await fetch_from_hub(cache, specs, HUB)
            left = cache.missing(specs)
            parts = list(tmp_path.rglob("*.part"))
            await cache.fetch(specs, master)
            return cache, got, left, parts
        finally:
            await hub.runner.cleanup()

    cache, got, left, parts = run(main())
    assert got == 0 and left and parts == []  # the attempt ended and left nothing half-trusted
    reason = {
        "corrupt": "do not match the manifest",
        "no-range": "HTTP 200 for a range request",
        "offline": "ClientConnectorError",
    }[mode]
    assert reason in caplog.text
    assert set(asked) == {s.sha256 for s in left}  # the master sent exactly what was missing
    assert (
        hub.whole_files <= 8
    )  # a server ignoring Range: dropped at its first answer (one window of requests in flight), bodies unread
    assert cache.missing(specs) == []
    _cached_bytes_equal_the_checkpoint(cache, specs, snapshot)


def test_paired_workers_of_a_hub_model_take_their_layers_from_the_hub(snapshot, tmp_path, monkeypatch, caplog):
    """End to end in one process: a paired group whose model is a hub snapshot (the master's
    weight source says so, as ``model_source.hub_ref`` makes it for a hub id); two workers read
    their ranges from the hub, the master sends no weights, and generation matches transformers."""
    import logging

    from harness import greedy, paired_config
    from tiny_models import reference_greedy

    from master_core.server import Master
    from worker_core.identity import client_context, load_or_create
    from worker_core.pairing import join
    from worker_core.worker import WorkerConfig, serve

    caplog.set_level(logging.INFO)
    prompt = [5, 6, 7, 8, 9]
    want = reference_greedy(snapshot, prompt, 12)
    hub = FakeHub(snapshot)

    async def main():
        monkeypatch.setattr(constants, "ENDPOINT", await hub.start())
        master = Master(paired_config(snapshot, tmp_path / "m", min_workers=2))
        await master.start()
        master.group.weights.hub = HUB
        tasks = []
        try:
            for name in ("alice", "bob"):
                ident = load_or_create(tmp_path / name / "identity", name)
                joined = await join("127.0.0.1", master.group_port.port, master.new_code(), name, ident.cert_pem)
                cfg = WorkerConfig(
                    master=f"127.0.0.1:{master.group_port.port}",
                    device="cpu",
                    tls=client_context(ident, joined.master_cert),
                    reconnect=False,
                    weights_dir=tmp_path / name / "weights",
                )
                tasks.append(asyncio.create_task(serve(cfg)))
            await asyncio.wait_for(master.group.wait_serving(), 60)
            return (await master.engine.generate(prompt, greedy(12)))[0]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await master.stop()
            await hub.runner.cleanup()

    assert run(main(), 180) == want
    assert caplog.text.count("weights read from the hub") == 2
    assert (
        "the master sends them" not in caplog.text and "from the master" not in caplog.text
    )  # no fallback, no master fetch
    assert hub.ranges and hub.whole_files == 0
