"""The relay (``molink relay``, worker_core.bridge_*): registration proved by the group's key,
single-use expiring session keys, caps, timeouts and rates; every bad input refused with its
reason while the good group keeps being served; a relay restart heals on its own.  Here the
"master" is worker_core.bridge_host.BridgeHost serving an echo over the relayed socket (the
real group through a relay is tests/test_bridge_group.py)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import time

import pytest
from harness import run

from worker_core.bridge_dial import BridgeForwarder, BridgeRefused, open_bridged
from worker_core.bridge_host import BridgeHost, BridgeState
from worker_core.bridge_server import BridgeLimits, BridgeServer
from worker_core.bridge_wire import (
    CHECK_SNI,
    HEADER,
    MAGIC,
    Accept,
    Call,
    Challenge,
    Check,
    Checked,
    Dial,
    Error,
    Malformed,
    Ok,
    Proof,
    Register,
    Registered,
    TooLarge,
    b64,
    encode,
    parse,
    proof_message,
    read_frame,
)
from worker_core.identity import load_or_create

_ECHOES: set[asyncio.Task] = set()
FAST = BridgeLimits(preamble_timeout=1.0, answer_timeout=1.0, idle_timeout=2.0, half_open_timeout=1.0)


async def _echo(sock: socket.socket, label: str) -> None:
    """The stand-in master: echo every byte of a relayed connection."""
    reader, writer = await asyncio.open_connection(sock=sock)

    async def serve() -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    task = asyncio.get_running_loop().create_task(serve())
    _ECHOES.add(task)  # held: a pending task nobody references may be collected
    task.add_done_callback(_ECHOES.discard)


async def _roundtrip(relay: str, group: str, payload: bytes = b"hello through the relay") -> bytes:
    reader, writer = await open_bridged(relay, group=group, timeout=10)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _raw(port: int, data: bytes, host: str = "127.0.0.1", source: str | None = None):
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def _refusal(reader: asyncio.StreamReader) -> Error:
    msg = await asyncio.wait_for(read_frame(reader.readexactly), 10)
    assert isinstance(msg, Error), msg
    assert await asyncio.wait_for(reader.read(), 10) == b"", "the relay must close after a refusal"
    return msg


class Stage:
    """A relay and an echo master registered at it, for one test."""

    def __init__(self, tmp_path, limits: BridgeLimits = FAST, tap=None) -> None:
        self.identity = load_or_create(tmp_path / "master", "master")
        self.server = BridgeServer(limits, tap=tap)
        self.nameplates: list[str] = []
        self.limits = limits

    async def __aenter__(self) -> Stage:
        await self.server.start("127.0.0.1", 0)
        self.relay = f"127.0.0.1:{self.server.port}"
        self.host = BridgeHost(self.relay, self.identity, lambda: list(self.nameplates), _echo)
        await self.host.start()
        await _until(lambda: self.host.state is BridgeState.REGISTERED)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.host.stop()
        await self.server.stop()

    @property
    def group(self) -> str:
        return self.identity.fingerprint

    async def still_serving(self) -> None:
        assert await _roundtrip(self.relay, self.group) == b"hello through the relay"


# ---------------------------------------------------------------- frames, pure


def test_preamble_frames_parse_typed_or_say_what_is_wrong():
    fp = "ab" * 32
    assert parse({"type": "dial", "group": fp}) == Dial(group=fp)
    assert parse({"type": "dial", "nameplate": "47"}) == Dial(nameplate="47")
    assert parse({"type": "register", "group": fp, "cert": "x", "nameplates": ["47", "47", "12"]}) == Register(
        fp, "x", ("47", "12")
    )
    bad = [
        ([], "JSON object"),
        ({"type": "pickle"}, "unknown frame type"),
        ({"type": "dial"}, "exactly one"),
        ({"type": "dial", "group": fp, "nameplate": "47"}, "exactly one"),
        ({"type": "dial", "group": "AB" * 32}, "malformed"),
        ({"type": "dial", "nameplate": "07"}, "malformed"),
        ({"type": "accept", "session": "x" * 32}, "malformed"),
        ({"type": "accept", "session": 5}, "string"),
        ({"type": "register", "group": fp, "cert": "x", "nameplates": ["1000"]}, "two digits"),
        ({"type": "register", "group": fp, "cert": "x", "nameplates": [str(i) for i in range(10, 99)] * 2}, "at most"),
    ]
    for obj, why in bad:
        with pytest.raises(Malformed, match=why):
            parse(obj)

    async def frames(data: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader.readexactly)

    assert run(frames(encode(Ok()))) == Ok()
    with pytest.raises(TooLarge):
        run(frames(HEADER.pack(MAGIC, 1, 60000) + b"{}"))
    with pytest.raises(Malformed, match="not a MoLink") as e:
        run(frames(b"\x16\x03\x01\x02\x00" + b"x" * 10))  # a TLS ClientHello where a preamble belongs
    assert e.value.code == "version"
    with pytest.raises(Malformed, match="version 9"):
        run(frames(HEADER.pack(MAGIC, 9, 2) + b"{}"))
    with pytest.raises(Malformed, match="UTF-8 JSON"):
        run(frames(HEADER.pack(MAGIC, 1, 3) + b"\xff\xfe{"))


# ---------------------------------------------------------------- the relay


def test_a_registered_group_is_reached_by_fingerprint_and_by_nameplate(tmp_path, monkeypatch):
    import worker_core.bridge_server as relay_module

    kept: list[bool] = []  # each spliced socket holds few unsent bytes (worker_core.unsent)
    real = relay_module.keep_unsent_low
    monkeypatch.setattr(relay_module, "keep_unsent_low", lambda t: kept.append(real(t)) or kept[-1])

    async def main():
        async with Stage(tmp_path) as st:
            await st.still_serving()
            big = secrets.token_bytes(3_000_000)
            assert await _roundtrip(st.relay, st.group, big) == big
            with pytest.raises(BridgeRefused, match="open pairing code") as e:
                await open_bridged(st.relay, nameplate="47", timeout=10)
            assert e.value.code == "unknown_group"
            st.nameplates.append("47")
            st.host.changed()
            await asyncio.sleep(0.3)
            reader, writer = await open_bridged(st.relay, nameplate="47", timeout=10)
            writer.write(b"by code")
            assert await asyncio.wait_for(reader.readexactly(7), 10) == b"by code"
            writer.close()
            async with BridgeForwarder(st.relay, group=st.group) as fwd:  # the clients' way: a local port
                r, w = await asyncio.open_connection("127.0.0.1", fwd.port)
                w.write(b"forwarded")
                assert await asyncio.wait_for(r.readexactly(9), 10) == b"forwarded"
                w.close()
            assert st.host.relayed == 4 and st.server.stats()["sessions_spliced"] == 4
            assert kept == [True] * 8  # both ends of each of the 4 sessions

    run(main(), 60)


def test_unknown_groups_and_wrong_proofs_are_refused_and_the_good_group_keeps_serving(tmp_path):
    async def main():
        async with Stage(tmp_path) as st:
            with pytest.raises(BridgeRefused, match="no such group") as e:
                await open_bridged(st.relay, group="cd" * 32, timeout=10)
            assert e.value.code == "unknown_group"

            # a registration signed by another key: the certificate is the group's, the proof is not
            other = load_or_create(tmp_path / "mallory", "mallory")
            for cert, key_of in ((st.identity.cert_pem, other), (other.cert_pem, other)):
                reader, writer = await _raw(st.server.port, encode(Register(st.group, cert)))
                challenge = await asyncio.wait_for(read_frame(reader.readexactly), 10)
                assert isinstance(challenge, Challenge)
                writer.write(encode(Proof(_sign(key_of, challenge.nonce, st.group))))
                refusal = await _refusal(reader)
                assert refusal.code == "bad_proof", refusal
                writer.close()
            # a replayed proof: a fresh challenge every time, so an old signature fails
            reader, writer = await _raw(st.server.port, encode(Register(st.group, st.identity.cert_pem)))
            old = await asyncio.wait_for(read_frame(reader.readexactly), 10)
            writer.close()
            reader, writer = await _raw(st.server.port, encode(Register(st.group, st.identity.cert_pem)))
            await asyncio.wait_for(read_frame(reader.readexactly), 10)
            assert isinstance(old, Challenge)
            writer.write(encode(Proof(_sign(st.identity, old.nonce, st.group))))
            assert (await _refusal(reader)).code == "bad_proof"
            writer.close()
            assert st.host.state is BridgeState.REGISTERED and st.host.registrations == 1
            await st.still_serving()

    run(main(), 60)


def _sign(identity, nonce: str, group: str) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(identity.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return b64(key.sign(proof_message(nonce, group), ec.ECDSA(hashes.SHA256())))


def test_session_keys_are_single_use_and_expire(tmp_path):
    """A hand-made master (raw frames) sees the session keys: one used twice, one answered late,
    one made up; each Accept gets its own reason."""

    async def main():
        identity = load_or_create(tmp_path / "m", "m")
        server = BridgeServer(FAST)
        await server.start("127.0.0.1", 0)
        relay = f"127.0.0.1:{server.port}"
        try:
            control_r, control_w = await _raw(server.port, encode(Register(identity.fingerprint, identity.cert_pem)))
            challenge = await read_frame(control_r.readexactly)
            assert isinstance(challenge, Challenge)
            control_w.write(encode(Proof(_sign(identity, challenge.nonce, identity.fingerprint))))
            assert isinstance(await read_frame(control_r.readexactly), Registered)

            dial = asyncio.create_task(open_bridged(relay, group=identity.fingerprint, timeout=10))
            call = await asyncio.wait_for(read_frame(control_r.readexactly), 10)
            assert isinstance(call, Call)
            mr, mw = await _raw(server.port, encode(Accept(call.session)))
            assert isinstance(await asyncio.wait_for(read_frame(mr.readexactly), 10), Ok)
            dr, dw = await dial
            dw.write(b"ping")
            assert await asyncio.wait_for(mr.readexactly(4), 10) == b"ping"

            rr, rw = await _raw(server.port, encode(Accept(call.session)))  # replayed
            assert (await _refusal(rr)).code == "used_session"
            rw.close()
            mw.write(b"pong")  # the first session is untouched
            assert await asyncio.wait_for(dr.readexactly(4), 10) == b"pong"

            late = asyncio.create_task(open_bridged(relay, group=identity.fingerprint, timeout=10))
            call2 = await asyncio.wait_for(read_frame(control_r.readexactly), 10)
            assert isinstance(call2, Call)
            with pytest.raises(BridgeRefused, match="did not answer") as e:
                await late
            assert e.value.code == "no_answer"
            er, ew = await _raw(server.port, encode(Accept(call2.session)))
            assert (await _refusal(er)).code == "expired_session"
            ur, uw = await _raw(server.port, encode(Accept(secrets.token_hex(16))))
            assert (await _refusal(ur)).code == "unknown_session"
            for w in (mw, dw, ew, uw, control_w):
                w.close()
        finally:
            await server.stop()

    run(main(), 60)


def test_floods_half_open_and_oversize_preambles_are_refused_while_the_group_serves(tmp_path):
    limits = BridgeLimits(
        max_per_ip=8, preamble_timeout=1.0, answer_timeout=1.0, idle_timeout=60.0, half_open_timeout=60.0
    )

    async def main():
        async with Stage(tmp_path, limits) as st:
            port = st.server.port
            # a flood from one address (127.0.0.2): 8 idle connections are held, the rest refused at once
            flood = [await _raw(port, b"", source="127.0.0.2") for _ in range(12)]
            codes = []
            for reader, _ in flood[8:]:
                codes.append((await _refusal(reader)).code)
            assert codes == ["busy"] * 4
            await st.still_serving()  # another address is served meanwhile
            # the 8 held ones said nothing: half-open, each closed after the preamble timeout
            for reader, _ in flood[:8]:
                assert (await _refusal(reader)).code == "timeout"
            # half a header, then silence
            reader, writer = await _raw(port, MAGIC + b"\x01")
            assert (await _refusal(reader)).code == "timeout"
            # oversize, wrong version, TLS instead of a preamble, a frame nobody starts with
            for data, code in (
                (HEADER.pack(MAGIC, 1, 65000) + b"x" * 100, "too_large"),
                (HEADER.pack(MAGIC, 2, 2) + b"{}", "version"),
                (b"\x16\x03\x01\x00\xa0" + b"\x01" * 160, "version"),
                (encode(Ok()), "malformed"),
                (struct.pack(">4sBH", MAGIC, 1, 5) + b"[1,2]", "malformed"),
            ):
                reader, writer = await _raw(port, data)
                assert (await _refusal(reader)).code == code, data[:12]
                writer.close()
            for _, writer in flood:
                writer.close()
            await st.still_serving()
            refused = st.server.stats()["refused"]
            assert refused["busy"] == 4 and refused["timeout"] == 9 and refused["too_large"] == 1

    run(main(), 60)


def test_a_half_closed_session_passes_the_close_on_and_idle_sessions_end(tmp_path):
    async def main():
        async with Stage(tmp_path) as st:  # idle 2 s, half-open 1 s
            reader, writer = await open_bridged(st.relay, group=st.group, timeout=10)
            writer.write(b"last words")
            writer.write_eof()  # the dialer is done sending; the echo master answers and closes
            assert await asyncio.wait_for(reader.read(), 10) == b"last words"
            writer.close()
            reader, writer = await open_bridged(st.relay, group=st.group, timeout=10)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # nothing sent: the relay ends it
            assert 1.5 < time.monotonic() - started < 6
            writer.close()
            await st.still_serving()

    run(main(), 60)


def test_session_and_global_rates_are_enforced(tmp_path):
    limits = BridgeLimits(session_rate=1e6, global_rate=10e6, preamble_timeout=1.0, answer_timeout=2.0)

    async def main():
        async with Stage(tmp_path, limits) as st:
            payload = secrets.token_bytes(2_000_000)  # 2 MB up and 2 MB back at 1 MB/s per direction
            started = time.monotonic()
            assert await _roundtrip(st.relay, st.group, payload) == payload
            took = time.monotonic() - started
            assert 0.9 < took < 8, took  # the first second is the burst; then 1 MB/s

    run(main(), 60)


def test_a_restarted_relay_is_registered_at_again_on_its_own(tmp_path):
    async def main():
        async with Stage(tmp_path) as st:
            await st.still_serving()
            port = st.server.port
            await st.server.stop()
            await _until(lambda: st.host.state is not BridgeState.REGISTERED)
            with pytest.raises(OSError):
                await open_bridged(st.relay, group=st.group, timeout=5)
            st.server = BridgeServer(FAST)
            await st.server.start("127.0.0.1", port)
            await _until(lambda: st.host.registrations == 2, timeout=20)
            await st.still_serving()

    run(main(), 60)


def test_relay_settings_are_checked_before_anything_starts():
    from master_core.config import MasterConfig
    from worker_core.bridge_wire import split_address

    with pytest.raises(ValueError, match="HOST:PORT"):
        MasterConfig(relay="relay.example", data_dir="/tmp/x").validate()
    with pytest.raises(ValueError, match="paired group"):
        MasterConfig(relay="relay.example:7735").validate()
    MasterConfig(relay="relay.example:7735", data_dir="/tmp/x").validate()
    assert split_address("[::1]:7735") == ("::1", 7735) and split_address("0.0.0.0:0", listen=True)[1] == 0
    for bad in ("x:0", "x:70000", ":1", "a b:1", "x"):
        with pytest.raises(ValueError):
            split_address(bad)


# ---------------------------------------------------------------- checking a mapped port from outside


async def _tls_server(identity) -> asyncio.Server:
    """A TLS listener on loopback presenting ``identity``'s certificate (the group port's stand-in)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(identity.cert_path, identity.key_path)

    async def answer(reader, writer):
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)


def test_the_relay_checks_a_masters_mapped_port_from_outside_once_per_interval(tmp_path):
    """The relay dials the master's own address (here loopback) at the asked port and says whose
    certificate answered: the master's own (reachable), a stranger's, or nothing; a second check
    within the interval is refused; bad Check frames are malformed."""
    assert parse({"type": "check", "port": 7733}) == Check(7733)
    assert parse({"type": "checked", "port": 7733, "fingerprint": "ab" * 32}) == Checked(7733, "ab" * 32)
    for bad in (
        {"type": "check", "port": 0},
        {"type": "check", "port": "7733"},
        {"type": "checked", "port": 1, "fingerprint": "x"},
    ):
        with pytest.raises(Malformed):
            parse(bad)
    from worker_core.pairing import PAIR_SNI

    assert CHECK_SNI == PAIR_SNI  # the group port answers it without a client certificate

    async def main():
        identity = load_or_create(tmp_path / "master", "master")
        stranger = load_or_create(tmp_path / "stranger", "stranger")
        own, other = await _tls_server(identity), await _tls_server(stranger)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        ports = {
            "own": own.sockets[0].getsockname()[1],
            "other": other.sockets[0].getsockname()[1],
            "closed": closed.getsockname()[1],
        }
        server = BridgeServer(BridgeLimits(check_interval=0.5))
        await server.start("127.0.0.1", 0)
        heard: list[tuple[int, bool, str]] = []
        asked = ["own"]
        host = BridgeHost(
            f"127.0.0.1:{server.port}",
            identity,
            lambda: [],
            _echo,
            mapped_port=lambda: ports[asked[0]],
            on_checked=lambda port, ok, why: heard.append((port, ok, why)),
        )
        await host.start()
        try:
            await _until(lambda: len(heard) == 1)
            assert heard[0] == (ports["own"], True, "")
            for name, why in (("other", "another certificate"), ("closed", "ConnectionRefusedError")):
                await asyncio.sleep(0.6)  # past the relay's interval
                asked[0] = name
                host.changed()  # the mapping moved: the next ping asks again
                before = len(heard)
                await _until(lambda: len(heard) == before + 1)  # noqa: B023 - awaited here, in this iteration
                port, ok, said = heard[-1]
                assert port == ports[name] and not ok and why in said, heard[-1]
            assert server.stats()["checks"] == 3
            # a second check within the interval: no dial, a reason
            group = server.groups[identity.fingerprint]
            answer = await server._check(group, group.writer, ports["own"])
            assert answer == Checked(ports["own"], "", "one check per 0.5 s") and server.stats()["checks"] == 3
        finally:
            await host.stop()
            await server.stop()
            for s in (own, other):
                s.close()
            closed.close()

    run(main(), 60)
