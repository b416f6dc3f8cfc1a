"""A paired group through a relay: the master registers at it, two members join by the code
alone through it, their workers serve through it, and greedy tokens equal single-process
transformers; the relay saw TLS records only (its tap captures every spliced byte)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from harness import greedy, output_line, paired_config, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.routes import hop_address
from master_core.server import Master
from worker_core.bridge_dial import BridgeForwarder
from worker_core.bridge_host import BridgeState
from worker_core.bridge_server import BridgeServer
from worker_core.identity import client_context, fingerprint, load_or_create
from worker_core.worker import WorkerConfig, serve

TLS_TYPES = {20, 21, 22, 23}  # change_cipher_spec, alert, handshake, application_data


def tls_records(stream: bytes) -> list[int]:
    """The content types of the TLS records ``stream`` is made of; AssertionError if it is not
    made of TLS records only (a whole number of them: every session here ended)."""
    types, at = [], 0
    while at < len(stream):
        assert at + 5 <= len(stream), f"a truncated record header at byte {at}"
        kind, major, minor, length = struct.unpack(">BBBH", stream[at : at + 5])
        assert kind in TLS_TYPES, f"byte {at}: record type {kind} is not TLS"
        assert (major, minor) in ((3, 1), (3, 3)), f"byte {at}: record version {major}.{minor}"
        assert length <= 2**14 + 256, f"byte {at}: record of {length} bytes"
        types.append(kind)
        at += 5 + length
    assert at == len(stream), "the last record is truncated"
    return types


async def tapped_relay(captured: dict[tuple[str, str], bytearray]) -> BridgeServer:
    """A relay on 127.0.0.1 (started) that adds every byte it splices to ``captured``
    ((session, "up" | "down") -> bytes)."""

    def tap(session: str, direction: str, data: bytes) -> None:
        captured.setdefault((session, direction), bytearray()).extend(data)

    relay = BridgeServer(tap=tap)
    await relay.start("127.0.0.1", 0)
    return relay


def test_tls_record_check_refuses_plain_bytes():
    assert tls_records(b"\x16\x03\x01\x00\x02ab\x17\x03\x03\x00\x01x") == [22, 23]
    for bad in (b"GET /v1/tunnel HTTP/1.1\r\n", b"\x17\x03\x03\x00\x09abc", b"MLBR\x01\x00\x02{}"):
        try:
            tls_records(bad)
        except AssertionError:
            continue
        raise AssertionError(f"{bad!r} passed as TLS")


def test_members_join_by_code_and_serve_through_the_relay_which_sees_only_tls(tmp_path):
    from app.group.client import pair_through_relay

    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt", num_layers=4)
    prompt = [41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]
    want = reference_greedy(ckpt, prompt, 12)
    captured: dict[tuple[str, str], bytearray] = {}

    async def main():
        relay = await tapped_relay(captured)
        address = f"127.0.0.1:{relay.port}"
        master = Master(paired_config(ckpt, tmp_path / "m", min_workers=2, relay=address))
        await master.start()
        tasks, forwarders = [], []
        try:
            assert master.bridge is not None
            deadline = time.monotonic() + 20
            while master.bridge.state is not BridgeState.REGISTERED:
                assert time.monotonic() < deadline, master.bridge.last_error
                await asyncio.sleep(0.02)
            for name in ("alice", "bob"):
                joined = await pair_through_relay(master.new_code(), address, tmp_path / name, name)
                assert joined.relay == address and joined.master_host == "" and joined.group == master.members.group
                ident = load_or_create(tmp_path / name / "identity", name)
                forwarder = BridgeForwarder(joined.relay, group=fingerprint(joined.master_cert))
                await forwarder.start()
                forwarders.append(forwarder)
                cfg = WorkerConfig(
                    master=forwarder.address,
                    device="cpu",
                    name=name,
                    tls=client_context(ident, joined.master_cert),
                    identity=ident,
                    hop_bind="127.0.0.1",
                    weights_dir=tmp_path / name / "weights",
                )
                tasks.append(asyncio.create_task(serve(cfg)))
            await asyncio.wait_for(master.group.wait_serving(), 120)
            got = (await master.engine.generate(prompt, greedy(12)))[0]
            links = list(master.group.links)
            peers = sorted(link.peer for link in links)
            addresses = [hop_address(links[0], links[1]), hop_address(links[1], links[0])]
            hops = [h.describe() for h in master.group.hops]
            return got, peers, addresses, hops, master.bridge.relayed
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await master.stop()
            for f in forwarders:
                await f.stop()
            await relay.stop()

    got, peers, addresses, hops, relayed = run(main(), 240)
    assert got == want
    # the master knows relayed members by certificate, never by the relay's address
    assert all(p.startswith("bridge:127.0.0.1:") for p in peers) and len(set(peers)) == 2, peers
    # so it hands out no address for them: the hop between two relayed members goes through the master
    assert addresses == ["", ""] and hops and all(h.startswith("relayed") for h in hops), (addresses, hops)
    # two pairings, two probes and two tunnels at least, every one spliced by the relay
    sessions = {s for s, _ in captured}
    assert relayed >= 6 and len(sessions) == relayed
    marker = struct.pack(f"<{len(prompt)}q", *prompt)  # the prompt as the wire carries it (int64 ids)
    for (session, direction), stream in captured.items():
        kinds = tls_records(bytes(stream))
        assert kinds[0] == 22, f"session {session} {direction} does not start with a TLS handshake"
        if direction == "up":
            assert 23 in kinds
        for plain in (marker, b"/v1/tunnel", b"/v1/pair", b"Upgrade", b"websocket", b"pake"):
            assert plain not in stream, f"plaintext {plain[:16]!r} seen by the relay ({session} {direction})"
    total = sum(len(s) for s in captured.values())
    assert total > 100_000, total  # the weights went through it too


def test_a_group_served_through_a_relay_heals_when_the_relay_restarts(tmp_path):
    """The relay stops while a member serves through it: the tunnel breaks, the master keeps
    re-registering and the worker keeps redialling (both on their own); once a relay listens
    again on the same address the group serves again, same tokens."""
    from app.group.client import pair_through_relay

    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt", num_layers=2)
    prompt = [9, 8, 7, 6, 5]
    want = reference_greedy(ckpt, prompt, 8)

    async def main():
        relay = BridgeServer()
        await relay.start("127.0.0.1", 0)
        port = relay.port
        address = f"127.0.0.1:{port}"
        master = Master(paired_config(ckpt, tmp_path / "m", min_workers=1, relay=address))
        await master.start()
        task, forwarder = None, None
        try:
            assert master.bridge is not None
            while master.bridge.state is not BridgeState.REGISTERED:
                await asyncio.sleep(0.02)
            joined = await pair_through_relay(master.new_code(), address, tmp_path / "w", "w")
            ident = load_or_create(tmp_path / "w" / "identity", "w")
            forwarder = BridgeForwarder(address, group=fingerprint(joined.master_cert))
            await forwarder.start()
            cfg = WorkerConfig(
                master=forwarder.address,
                device="cpu",
                name="w",
                tls=client_context(ident, joined.master_cert),
                identity=ident,
                hop_bind="127.0.0.1",
                weights_dir=tmp_path / "w" / "weights",
            )
            task = asyncio.create_task(serve(cfg))
            await asyncio.wait_for(master.group.wait_serving(), 120)
            before = (await master.engine.generate(prompt, greedy(8)))[0]
            await relay.stop()
            deadline = time.monotonic() + 30
            while master.group.links:  # the tunnel went down with the relay
                assert time.monotonic() < deadline, "the tunnel outlived the relay"
                await asyncio.sleep(0.05)
            relay = BridgeServer()
            await relay.start("127.0.0.1", port)
            await asyncio.wait_for(master.group.wait_serving(), 120)
            after = (await master.engine.generate(prompt, greedy(8)))[0]
            return before, after, master.bridge.registrations
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await master.stop()
            if forwarder is not None:
                await forwarder.stop()
            await relay.stop()

    before, after, registrations = run(main(), 240)
    assert before == after == want
    assert registrations == 2


def test_a_relayed_worker_moves_its_tunnel_to_a_direct_path_once_one_answers(tmp_path, monkeypatch):
    """A member whose only way to the master answering is the relay serves through it; once a
    direct address of its invitation answers (here a port that starts forwarding to the
    master's group port, as a mapping the router makes later would), the worker, idle, moves its
    tunnel there by itself: the group serves again over the direct path, same tokens.  While a
    request runs it does not move."""
    import io

    from app.group.client import pair_through_relay
    from app.tools.netlab.tcp_proxy import TcpProxy
    from worker_core import worker as worker_module
    from worker_core.control import EVENT_PREFIX, Events

    monkeypatch.setattr(worker_module, "BETTER_PATH_EVERY", 0.2)
    monkeypatch.setattr(worker_module, "BETTER_PATH_IDLE", 1.0)
    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt", num_layers=2)
    prompt = [9, 8, 7, 6, 5]
    want = reference_greedy(ckpt, prompt, 8)
    stream = io.StringIO()

    def paths() -> list[str]:
        lines = [
            json.loads(x[len(EVENT_PREFIX) :]) for x in stream.getvalue().splitlines() if x.startswith(EVENT_PREFIX)
        ]
        return [e["path"] for e in lines if e["event"] == "connected"]

    async def main():
        relay = BridgeServer()
        await relay.start("127.0.0.1", 0)
        address = f"127.0.0.1:{relay.port}"
        master = Master(paired_config(ckpt, tmp_path / "m", min_workers=1, relay=address))
        await master.start()
        task, proxy = None, None
        try:
            assert master.bridge is not None and master.group_port is not None
            while master.bridge.state is not BridgeState.REGISTERED:
                await asyncio.sleep(0.02)
            joined = await pair_through_relay(master.new_code(), address, tmp_path / "w", "w")
            ident = load_or_create(tmp_path / "w" / "identity", "w")
            direct = _free_port()  # nothing answers there yet
            cfg = WorkerConfig(
                master="",
                candidates=(f"relay~{address}", f"mapped~127.0.0.1:{direct}"),
                group=fingerprint(joined.master_cert),
                device="cpu",
                name="w",
                tls=client_context(ident, joined.master_cert),
                identity=ident,
                hop_bind="127.0.0.1",
                weights_dir=tmp_path / "w" / "weights",
                retry_seconds=0.2,
            )
            task = asyncio.create_task(serve(cfg, events=Events(stream)))
            await asyncio.wait_for(master.group.wait_serving(), 120)
            before = (await master.engine.generate(prompt, greedy(8)))[0]
            relayed_first = paths()
            proxy = TcpProxy("127.0.0.1", master.group_port.port, listen_port=direct)
            await proxy.start()
            # a request in flight holds the tunnel where it is
            slow = asyncio.ensure_future(master.engine.generate(prompt, greedy(8)))
            during = (await slow)[0]
            assert len(paths()) == 1  # not moved while it ran (nor within BETTER_PATH_IDLE of its last step)
            deadline = time.monotonic() + 60
            while len(paths()) < 2 or not master.group.serving:
                assert time.monotonic() < deadline, f"the tunnel did not move: {paths()}"
                await asyncio.sleep(0.05)
            after = (await master.engine.generate(prompt, greedy(8)))[0]
            return before, during, after, relayed_first, paths(), proxy.accepted
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await master.stop()
            if proxy is not None:
                await proxy.close()
            await relay.stop()

    before, during, after, first, seen, accepted = run(main(), 240)
    assert before == during == after == want
    assert first == [f"relayed through 127.0.0.1:{first[0].rsplit(':', 1)[1]}"]
    assert len(seen) == 2 and not seen[1].startswith("relayed"), seen
    assert accepted >= 1  # the tunnel (and the handshakes that found the path) went through the new port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _molink(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is TerminateProcess there: no clean exit to check")
def test_the_command_line_through_a_relay_relay_create_join_by_code_worker_answer(tmp_path):
    """`molink relay`, `molink group create --relay`, `molink join CODE --relay` (no --master, no
    mDNS: the code alone), `molink worker --via-relay` (its membership names no master address;
    without --via-relay its race would take the master's loopback candidate), an answer."""
    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt", num_layers=4)
    relay_port, api_port = _free_port(), _free_port()
    relay = f"127.0.0.1:{relay_port}"
    procs = []
    try:
        procs.append(_molink("relay", "--listen", relay))
        output_line(procs[-1], "relay listening on", 60)
        master_dir = tmp_path / "master"
        procs.append(
            _molink(
                "group", "create", "--model", str(ckpt), "--host", "127.0.0.1", "--port", "0",
                "--api-port", str(api_port), "--data-dir", str(master_dir), "--relay", relay, "--name", "far",
            )
        )  # fmt: skip
        code = output_line(procs[-1], "Pairing code:", 120).split()[-1]
        joined = subprocess.run(
            [sys.executable, "-m", "app.cli", "join", code, "--relay", relay, "--data-dir", str(tmp_path / "w")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert joined.returncode == 0, joined.stderr
        assert "Joined group 'far'" in joined.stdout and f"through relay {relay}" in joined.stdout
        bad = subprocess.run(
            [sys.executable, "-m", "app.cli", "join", "55-5555-5555" if code[:2] != "55" else "66-6666-6666",
             "--relay", relay, "--data-dir", str(tmp_path / "x")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 1 and "unknown_group" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        procs.append(
            _molink("worker", "--data-dir", str(tmp_path / "w"), "--device", "cpu", "--threads", "1", "--via-relay")
        )
        output_line(procs[-1], "reaching the master through relay", 60)
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "the group never served through the relay"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{api}/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        body = {"model": model, "prompt": [7, 8, 9, 10], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        req = urllib.request.Request(
            f"{api}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        from transformers import AutoTokenizer

        want = AutoTokenizer.from_pretrained(ckpt).decode(reference_greedy(ckpt, [7, 8, 9, 10], 6))
        assert text == want
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
