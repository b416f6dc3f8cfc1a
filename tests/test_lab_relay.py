"""The relay on real network stacks (app/tools/netlab): a master behind a carrier-grade NAT, which
no router can map, is reached through a relay on the lab's internet, and the relay sees TLS only.

One lab per module (the ``cgnat`` topology: home c behind its router behind a carrier's NAT,
home b behind its own router, ``pub`` on the internet), with ``molink relay`` running on pub.
Needs root and ``ip netns`` (CI runs as root) and tcpdump; without them every test is skipped,
saying why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.tools.netlab.capture import Capture, Stream, connections
from app.tools.netlab.lab import Lab, unavailable

ROOT = Path(__file__).resolve().parents[1]
REASON = unavailable() or (None if shutil.which("tcpdump") else "the relay capture needs tcpdump")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

RELAY_PORT = 7735
TLS_TYPES = {20, 21, 22, 23}


class Proc:
    """A program in the lab whose merged output a thread keeps reading (so no pipe ever fills)."""

    def __init__(self, lab: Lab, host: str, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = lab.spawn(host, [sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def wait_for(self, match: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match(line):
                    return line.strip()
            if self.popen.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no such line within {timeout:.0f} s; output:\n{self.output()}")

    def output(self) -> str:
        return "".join(self.lines)[-6000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        self._reader.join(5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), num_layers=4)


@pytest.fixture(scope="module")
def relaylab() -> Iterator[tuple[Lab, str]]:
    """The cgnat lab (50 Mbit/s, 10 ms one way on each home's router) with ``molink relay`` on pub."""
    with Lab.up("trelay", "cgnat", mbps=50, delay_ms=10) as lab:
        relay = Proc(lab, "pub", ["relay", "--listen", f"0.0.0.0:{RELAY_PORT}"])
        try:
            relay.wait_for(lambda line: line.startswith("relay listening"), 60)
            yield lab, f"{lab.address('pub')}:{RELAY_PORT}"
        finally:
            relay.stop()


def frames(data: bytes) -> tuple[list[object], int]:
    """The relay preamble frames at the start of ``data`` (parsed by the relay's own parser) and
    where the bytes after them begin."""
    from worker_core.bridge_wire import HEADER, MAGIC, VERSION, parse

    out, at = [], 0
    while data[at : at + 4] == MAGIC and at + HEADER.size <= len(data):
        _magic, version, length = HEADER.unpack_from(data, at)
        assert version == VERSION
        body = data[at + HEADER.size : at + HEADER.size + length]
        assert len(body) == length, "a truncated preamble frame"
        out.append(parse(json.loads(body)))
        at += HEADER.size + length
    return out, at


def tls_records(stream: bytes) -> list[int]:
    """The content types of the TLS records ``stream`` is made of; AssertionError otherwise."""
    kinds, at = [], 0
    while at < len(stream):
        assert at + 5 <= len(stream), f"a truncated record header at byte {at}"
        kind, major, minor, length = stream[at], stream[at + 1], stream[at + 2], int.from_bytes(stream[at + 3 : at + 5])
        assert kind in TLS_TYPES, f"byte {at}: record type {kind} is not TLS"
        assert (major, minor) in ((3, 1), (3, 3)), f"byte {at}: record version {major}.{minor}"
        assert length <= 2**14 + 256, f"byte {at}: record of {length} bytes"
        kinds.append(kind)
        at += 5 + length
    assert at == len(stream), "the last record is truncated"
    return kinds


def check_relayed(conns: list[tuple[Stream, Stream | None]], plain: list[bytes]) -> dict[str, int]:
    """Every connection to the relay is either a master's control connection (preamble frames
    only) or a spliced one: one preamble frame each way, then TLS records to the last byte; no
    ``plain`` bytes anywhere.  Returns counts by kind and the TLS bytes seen."""
    from worker_core.bridge_wire import Accept, Call, Challenge, Dial, Ok, Ping, Pong, Proof, Register, Registered

    seen = {"control": 0, "dial": 0, "accept": 0, "tls_bytes": 0}
    for up, down in conns:
        assert up.syn and up.gaps == 0 and down is not None and down.gaps == 0, (up.src, up.sport)
        assert _ended(up, down), f"connection {up.src}:{up.sport} still open when the capture ended"
        for stream in (up, down):
            for p in plain:
                assert p not in stream.data, f"plaintext {p[:16]!r} crossed the relay ({stream.src}:{stream.sport})"
        sent, at_up = frames(up.data)
        answered, at_down = frames(down.data)
        assert sent, f"{up.src}:{up.sport} did not start with a preamble frame"
        if isinstance(sent[0], Register):
            assert all(isinstance(f, (Register, Proof, Ping)) or type(f).__name__ == "Nameplates" for f in sent)
            assert all(isinstance(f, (Challenge, Registered, Pong, Call)) for f in answered)
            assert at_up == len(up.data) and at_down == len(down.data), "bytes after a control frame"
            seen["control"] += 1
            continue
        assert len(sent) == 1 and isinstance(sent[0], (Dial, Accept)), sent
        assert [type(f) for f in answered] == [Ok], answered  # every dial here is answered
        for rest in (up.data[at_up:], down.data[at_down:]):
            kinds = tls_records(rest)
            assert kinds and kinds[0] == 22, "a spliced stream that does not start with a TLS handshake"
            seen["tls_bytes"] += len(rest)
        seen["dial" if isinstance(sent[0], Dial) else "accept"] += 1
    return seen


def _ended(up: Stream, down: Stream) -> bool:
    """Closed both ways, or reset (a side quit with bytes unread)."""
    return (up.fin and down.fin) or up.rst or down.rst


def _all_ended(streams: dict[tuple[str, int, str, int], Stream]) -> bool:
    """``streams`` holds connections to the relay and every one has ended, each way without a
    missing byte."""
    conns = connections(streams, RELAY_PORT)
    return bool(conns) and all(
        down is not None and up.gaps == 0 and down.gaps == 0 and _ended(up, down) for up, down in conns
    )


def _stop_capture(capture: Capture, timeout: float = 15.0) -> dict[tuple[str, int, str, int], Stream]:
    """Once the programs stopped: wait (bounded) until the capture itself holds the end of every
    connection to the relay, then stop it.  A FIN reaches the pcap file a little after it crossed
    (tcpdump is a process like any other, slower under load), and waiting on the relay host's
    sockets (ss) instead let the capture stop with an end not yet written; a connection that
    really stays open makes this wait time out, and check_relayed says so."""
    capture.wait(_all_ended, timeout)
    return capture.stop()


def test_tls_and_frame_checks_refuse_plain_bytes():
    from worker_core.bridge_wire import Dial, Ok, encode

    assert tls_records(b"\x16\x03\x01\x00\x02ab\x17\x03\x03\x00\x01x") == [22, 23]
    assert frames(encode(Dial(group="ab" * 32)) + b"\x16\x03\x01")[1] == len(encode(Dial(group="ab" * 32)))
    for bad in (b"GET / HTTP/1.1\r\n", b"\x17\x03\x03\x00\x05abc", b"\x16\x03\x03"):
        with pytest.raises(AssertionError):
            tls_records(bad)
    up = Stream("1.1.1.1", 5, "2.2.2.2", RELAY_PORT, syn=True, fin=True, data=encode(Dial(group="ab" * 32)) + b"hi")
    down = Stream("2.2.2.2", RELAY_PORT, "1.1.1.1", 5, syn=True, fin=True, data=encode(Ok()) + b"\x16\x03\x03\x00\x00")
    with pytest.raises(AssertionError):
        check_relayed([(up, down)], [])


def test_the_capture_counts_bytes_missing_before_a_fin_and_leaves_out_a_record_still_being_written(tmp_path):
    from app.tools.netlab.capture import read_pcap

    def packet(seq: int, flags: int, payload: bytes = b"") -> bytes:
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0, 64, 6, 0, bytes([1, 1, 1, 1]),
                         bytes([2, 2, 2, 2]))  # fmt: skip
        tcp = struct.pack(">HHIIBBHHH", 5, RELAY_PORT, seq, 0, 5 << 4, flags, 0, 0, 0)
        frame = bytes(12) + b"\x08\x00" + ip + tcp + payload
        return struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame

    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    # SYN at 99, bytes 0-3, bytes 4-7 never seen, FIN after byte 11: four bytes missing before the FIN
    path = tmp_path / "p.pcap"
    path.write_bytes(header + packet(99, 0x02) + packet(100, 0x10, b"abcd") + packet(108, 0x11, b"ijkl"))
    (up,) = read_pcap(path).values()
    assert up.syn and up.fin and up.gaps == 4 and up.data == b"abcd" + bytes(4) + b"ijkl"
    path.write_bytes(header + packet(99, 0x02) + packet(100, 0x10, b"abcd") + packet(104, 0x11, b"efgh")[:-3])
    (up,) = read_pcap(path).values()  # the FIN's record is cut short: not read
    assert up.syn and not up.fin and up.gaps == 0 and up.data == b"abcd"


def _ask(lab: Lab, host: str, ckpt: Path) -> tuple[str, str, list[int]]:
    """(the group's answer, single-process transformers' answer, the prompt's token ids)."""
    from test_lab import ASK
    from tiny_models import reference_greedy
    from transformers import AutoTokenizer

    asked = lab.run(host, [sys.executable, "-c", ASK, "http://127.0.0.1:8000"], timeout=150)
    answer = json.loads(asked.stdout)["message"]["content"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return answer, tok.decode(reference_greedy(ckpt, prompt, 6), skip_special_tokens=True), prompt


@pytest.mark.slow
def test_master_behind_carrier_nat_serves_a_friend_through_the_relay_which_sees_tls_only(relaylab, ckpt, tmp_path):
    """Master on c (behind its router and a carrier-grade NAT: nothing can be mapped), a friend on
    b joins with the join link alone (its LAN candidate fails, the relay candidate wins the race)
    and serves through the relay (the worker's race picks it again); tokens equal single-process
    transformers'; a capture on the relay's host shows only preamble frames and TLS records."""
    from test_lab import HEALTH

    lab, relay = relaylab
    capture = Capture(lab, "pub", "wan0", RELAY_PORT, tmp_path / "relay.pcap")
    capture.start()
    procs: list[Proc] = []
    try:
        master = Proc(lab, "c", ["group", "create", "--model", str(ckpt), "--port", "7733", "--api-port", "8000",
                                 "--data-dir", str(tmp_path / "m"), "--name", "far", "--relay", relay])  # fmt: skip
        procs.append(master)
        master.wait_for(lambda line: line.startswith("Pairing code:"), 120)
        link = master.wait_for(lambda line: line.startswith("Join link:"), 30).split()[-1]
        reach = master.wait_for(lambda line: "can join" in line, 30)
        assert f"friends anywhere can join through relay {relay}" in reach, reach  # nothing mapped behind the CGNAT
        assert f"relay~{relay}" in link and "mapped~" not in link, link
        master.wait_for(lambda line: "registered at relay" in line, 30)

        joined = lab.run("b", [sys.executable, "-m", "app.cli", "join", link, "--data-dir", str(tmp_path / "w"),
                               "--name", "friend"], timeout=120, check=False)  # fmt: skip
        assert joined.returncode == 0, joined.stderr + master.output()
        assert f"through relay {relay}" in joined.stdout, joined.stdout
        membership = json.loads((tmp_path / "w" / "membership.json").read_text())
        assert membership["master_host"] == "" and membership["relay"] == relay

        worker = Proc(lab, "b", ["worker", "--data-dir", str(tmp_path / "w"), "--device", "cpu", "--threads", "1"])
        procs.append(worker)
        up = lab.run("c", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "180"], timeout=200, check=False)
        assert up.returncode == 0, "the group never served:\n" + master.output() + worker.output()
        worker.wait_for(lambda line: f"through relay {relay}" in line, 5)
        answer, want, prompt = _ask(lab, "c", ckpt)
        assert answer == want
        members = lab.run("c", [sys.executable, "-m", "app.cli", "group", "members", "--data-dir", str(tmp_path / "m")],
                          timeout=30)  # fmt: skip
        assert "; link relayed, " in members.stdout, members.stdout
    finally:
        for p in reversed(procs):
            p.stop()
        streams = _stop_capture(capture)
    assert capture.dropped == 0, f"tcpdump dropped {capture.dropped} packets"
    conns = connections(streams, RELAY_PORT)
    # who dialled the relay: home c's carrier and home b's router, never a LAN address
    assert {up.src for up, _ in conns} == {lab.wan_address("c"), lab.wan_address("b")}, {u.src for u, _ in conns}
    from safetensors import safe_open

    with safe_open(str(Path(ckpt) / "model.safetensors"), "pt") as f:
        layer = f.get_tensor("model.layers.1.mlp.down_proj.weight").numpy().tobytes()  # sent raw, as stored
    plain = [
        struct.pack(f"<{len(prompt)}q", *prompt),  # the prompt as the wire carries it (int64 ids)
        layer[len(layer) // 2 : len(layer) // 2 + 64],  # 64 bytes of a layer the friend fetched
        b"/v1/tunnel", b"/v1/pair", b"Upgrade", b"websocket", b"friend",
    ]  # fmt: skip
    seen = check_relayed(conns, plain)
    assert seen["control"] >= 1 and seen["dial"] >= 3 and seen["accept"] == seen["dial"], seen  # pair, probe, tunnel
    assert seen["tls_bytes"] > 4 * len(layer), seen  # the four layers' weights went through it


@pytest.mark.slow
def test_the_relay_checks_a_mapped_port_from_outside_and_the_link_marks_it_verified(relaylab, ckpt, tmp_path):
    """Master on b (its router maps the group port) registered at the relay: the relay dials the
    mapped address from the internet, b's master answers with its own certificate, so the master
    says so and its join link marks the mapped candidate verified (``~v``)."""
    lab, relay = relaylab
    wan = lab.wan_address("b")
    master = Proc(lab, "b", ["group", "create", "--model", str(ckpt), "--port", "7733", "--api-port", "8000",
                             "--data-dir", str(tmp_path / "m"), "--name", "near", "--relay", relay])  # fmt: skip
    try:
        master.wait_for(lambda line: line.startswith("Pairing code:"), 120)
        said = master.wait_for(lambda line: "checked from outside by relay" in line, 30)
        assert f"port 7733 mapped on your router ({wan}:7733; checked from outside by relay {relay})" in said, said
        code = lab.run("b", [sys.executable, "-m", "app.cli", "group", "code", "--data-dir", str(tmp_path / "m")])
        link = next(x for x in code.stdout.splitlines() if x.startswith("Join link:")).split()[-1]
        assert f"mapped~{wan}:7733~v" in link, link
    finally:
        master.stop()


@pytest.mark.slow
def test_stages_behind_symmetric_nats_take_their_hop_through_the_relay_not_the_master(ckpt, tmp_path):
    """Master and relay on pub; one worker in each of homes s and t, both behind symmetric NATs
    whose routers map nothing: neither stage can dial the other (the dial to the other router's
    address fails), so each hop goes through the relay, where each worker registered its hop
    listener under its own certificate, and not through the master.  The tokens equal
    single-process transformers'; a capture on the relay shows the hops' bytes crossing it as TLS
    records only."""
    from test_lab import HEALTH, WORKERS

    with Lab.up("trhop", "relayhops") as lab:
        relay_proc = Proc(lab, "pub", ["relay", "--listen", f"0.0.0.0:{RELAY_PORT}"])
        relay = f"{lab.address('pub')}:{RELAY_PORT}"
        procs: list[Proc] = [relay_proc]
        capture: Capture | None = None
        try:
            relay_proc.wait_for(lambda line: line.startswith("relay listening"), 60)
            master = Proc(lab, "pub", ["group", "create", "--model", str(ckpt), "--port", "7733", "--api-port",
                                       "8000", "--data-dir", str(tmp_path / "m"), "--name", "hops", "--min-workers",
                                       "2", "--no-port-mapping", "--relay", relay])  # fmt: skip
            procs.append(master)
            master.wait_for(lambda line: line.startswith("Pairing code:"), 120)
            master.wait_for(lambda line: "registered at relay" in line, 30)
            # from here on every connection to the relay comes from the homes (the master's is local)
            capture = Capture(lab, "pub", "wan0", RELAY_PORT, tmp_path / "relay.pcap")
            capture.start()
            workers = {}
            for name, home in (("ws", "s"), ("wt", "t")):
                code = lab.run("pub", [sys.executable, "-m", "app.cli", "group", "code", "--data-dir",
                                       str(tmp_path / "m")], timeout=60)  # fmt: skip
                link = next(x for x in code.stdout.splitlines() if x.startswith("Join link:")).split()[-1]
                joined = lab.run(home, [sys.executable, "-m", "app.cli", "join", link, "--data-dir",
                                        str(tmp_path / name), "--name", name], timeout=120, check=False)  # fmt: skip
                assert joined.returncode == 0, joined.stderr + master.output()
                workers[name] = Proc(lab, home, ["worker", "--data-dir", str(tmp_path / name), "--device", "cpu",
                                                 "--threads", "1"])  # fmt: skip
                procs.append(workers[name])
            up = lab.run("pub", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "180"], timeout=200,
                         check=False)  # fmt: skip
            assert up.returncode == 0, "the group never served:\n" + master.output()
            state = json.loads(lab.run("pub", [sys.executable, "-c", WORKERS, "http://127.0.0.1:8000"]).stdout)
            stages = sorted((w for w in state if w["stage"] is not None), key=lambda w: w["stage"])
            assert len(stages) == 2, state
            # the hop and the loop-back: each stage to the other, through the relay
            for w in stages:
                assert w["next_hop"] and f"through relay {relay} (" in w["next_hop"], (w["name"], state)
            for name, w in workers.items():  # each first tried the other home's router, then the relay
                other = lab.wan_address("t" if name == "ws" else "s")
                w.wait_for(lambda line, at=other: f"not reachable directly ({at}:7734: " in line, 10)
                w.wait_for(lambda line: f"direct hop to the next stage through relay {relay}" in line, 10)
            answer, want, prompt = _ask(lab, "pub", ckpt)
            assert answer == want
        finally:
            for p in reversed(procs):
                p.stop()
            streams = _stop_capture(capture) if capture is not None else {}
        assert capture is not None and capture.dropped == 0, "tcpdump dropped packets"
        conns = connections(streams, RELAY_PORT)
        # who dialled the relay: the two homes' routers (registrations, dials, dial-backs), never the master
        assert {up.src for up, _ in conns} == {lab.wan_address("s"), lab.wan_address("t")}, {u.src for u, _ in conns}
        plain = [struct.pack(f"<{len(prompt)}q", *prompt), b"/v1/hop", b"X-MoLink-Hop", b"websocket", b"Upgrade"]
        seen = check_relayed(conns, plain)
        # each worker's registration; the hop and the loop-back, each a dial and its dial-back
        assert seen["control"] >= 2 and seen["dial"] >= 2 and seen["accept"] == seen["dial"], seen
        assert seen["tls_bytes"] > 0, seen
