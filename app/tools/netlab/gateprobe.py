"""Probe the in-flight gate (worker_core.inflight) and the relay's legs on real network stacks, in
a minute where a whole group's burst (:mod:`app.tools.netlab.burstlab`) takes four.

Contract
--------
``python -m app.tools.netlab.gateprobe {router,line,chunks,relay} [--rounds N] [--out F]`` (root,
as the lab) runs one sender of bulk bytes and small urgent frames per mode, as the links send
them: one TCP connection with CUBIC (``--congestion``), the kernel's unsent bytes kept low
(:func:`worker_core.unsent.keep_unsent_low`), an :class:`~worker_core.outbox.Outbox` holding a
:class:`Load` (``ONE_BULK``: 6 MB of bulk in 16 KiB pieces queued at once, and a 200-byte urgent
frame every 50 ms, 40 in all), with the gate (``gate``) or without (``plain``).  The receiver
reports each urgent frame's wait (from its writing to its arrival; the two ends share this
machine's clock), the rate the bulk crossed at, and each chunk's time from being queued to its
last byte's arrival.

* ``router``: one home's host sends to a public host through the home router's 20 Mbit/s uplink
  (``tbf``, a 200 ms queue) (:func:`router`).
* ``line``: across a delay line of TUN devices (:class:`~app.tools.netlab.tunlink.DelayLine`,
  ``--delay-ms`` one way, default 100, ``--mbps``, default 20), so TCP sees the round trip; the
  waits reported include the line's one-way delay (:func:`line`).
* ``chunks``: the line with the load ``CHUNKS``: a prefill step's activations (about 360 kB,
  queued at once) every 1.5 s and a decode step's frame (7 kB) every 0.45 s, as a direct hop
  carries them during a burst across 200 ms; the time each chunk took is reported beside the
  urgent frames' waits.
* ``relay``: a sender, a relay and a receiver on the lab's internet, every link 20 Mbit/s but the
  one ``--slowest`` names at 10 (``b``: the receiver's downlink, the relay's second leg;
  ``relay``: the relay's downlink, its first leg); the sender's outbox gated in both modes, the
  relay's splice (:meth:`worker_core.bridge_server.BridgeServer._splice`) with its gate
  (``gate``) or without (``plain``) (:func:`relay`).

Each round runs ``plain`` then ``gate``; it prints per round and mode the urgent frames' median
and p90 wait and the bulk's Mbit/s, and writes every figure as JSON to ``--out``.  ``line`` and
``chunks`` with ``--windows`` also run two modes of a sender as on Windows, emulated on Linux's TCP
(no Windows here): ``plain-stack``, the kernel's unsent bytes not kept low (Windows has no
``TCP_NOTSENT_LOWAT``) and no gate; ``gate-count``, the same stack with the gate told what
Windows' ``SIO_TCP_INFO`` tells (:mod:`worker_core.tcp_info`: no unsent count), so that it counts
the unsent bytes from what the sender hands the connection (:meth:`~worker_core.inflight.InFlight.wrote`).  The tests of
the gate (``tests/test_inflight.py``) call the same functions with one round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .lab import Hosts, Lab, LabError, unavailable
from .topology import Home, Topology, plan
from .tunlink import B_ADDRESS, DelayLine

ROOT = Path(__file__).resolve().parents[3]
PORT = 9000
MODES = ("plain", "gate")
WINDOWS_MODES = ("plain-stack", "gate-count")  # a sender as on Windows (the module docstring)

# the receiver: argv[1] connections, one after another; per connection a JSON line with each urgent
# frame's wait, the bulk's bytes/s and each chunk's time from being queued to its last byte here
RECEIVER = r"""
import json, socket, struct, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", PORT)); s.listen()
print("ready", flush=True)
for _ in range(int(sys.argv[1])):
    c, _ = s.accept(); buf = bytearray(); late = []; chunks = {}; bulk = 0; t0 = t1 = None
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        buf += d
        while len(buf) >= 17:
            kind, sent, chunk, n = struct.unpack_from("!BdII", buf)
            if len(buf) < 17 + n:
                break
            del buf[:17 + n]
            now = time.monotonic()
            if kind == 1:
                late.append(now - sent)
            else:
                t0 = t0 or now; bulk += n; t1 = now; chunks[chunk] = now - sent
    rate = bulk / max(1e-3, t1 - t0) if t0 is not None and t1 is not None else 0.0
    print(json.dumps({"late": late, "bulk_rate": rate, "chunks": list(chunks.values())}), flush=True)
    c.close()
""".replace("PORT", str(PORT))

# the sender: argv[1] the receiver's (or relay's) address, argv[2] its mode (MODES, WINDOWS_MODES), argv[3] the
# repository, argv[4] the Load as JSON, argv[5] its TCP congestion control (as the module docstring says)
SENDER = r"""
import asyncio, dataclasses, json, socket, struct, sys, time
sys.path.insert(0, sys.argv[3])
from worker_core import tcp_info
from worker_core.inflight import gate, room_of
from worker_core.outbox import Outbox
from worker_core.unsent import keep_unsent_low

load, mode = json.loads(sys.argv[4]), sys.argv[2]
if mode == "gate-count":  # what Windows tells: no count of the unsent bytes
    linux_read = tcp_info.read

    def as_windows(sock):
        c = linux_read(sock)
        return None if c is None else dataclasses.replace(c, unsent=None)

    tcp_info.read = as_windows

async def main():
    reader, writer = await asyncio.open_connection(sys.argv[1], PORT)
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[5].encode())
    if mode in ("plain", "gate"):
        keep_unsent_low(writer.transport)

    g = gate(writer.transport) if mode.startswith("gate") else None

    async def ship(item):
        kind, queued, chunk, payload = item  # an urgent frame's wait counts from its writing
        data = struct.pack("!BdII", kind, queued or time.monotonic(), chunk, len(payload)) + payload
        if g is not None:
            g.wrote(len(data))
        writer.write(data)
        await writer.drain()

    box = Outbox(ship, room=room_of(g))

    async def urgent():
        for _ in range(load["urgents"]):
            await asyncio.sleep(load["urgent_every"])
            box.put((1, 0.0, 0, b"u" * load["urgent_bytes"]), urgent=True)

    frames = asyncio.get_running_loop().create_task(urgent())
    for chunk in range(load["chunks"]):
        if chunk:
            await asyncio.sleep(load["gap"])
        queued = time.monotonic()
        for _ in range(load["pieces"]):
            box.put((0, queued, chunk, b"x" * 16384))
    await frames
    await box.flush(60)
    await box.close()
    writer.close()
    await writer.wait_closed()

asyncio.run(main())
""".replace("PORT", str(PORT))


@dataclass(frozen=True)
class Load:
    """What a sender sends: ``chunks`` chunks of ``pieces`` 16 KiB pieces, ``gap`` seconds apart,
    queued at once each, and ``urgents`` urgent frames of ``urgent_bytes``, one every
    ``urgent_every`` seconds from the start."""

    pieces: int
    chunks: int
    gap: float
    urgent_bytes: int
    urgent_every: float
    urgents: int


ONE_BULK = Load(pieces=384, chunks=1, gap=0.0, urgent_bytes=200, urgent_every=0.05, urgents=40)  # 6 MB at once
# a prefill step's activations (about 360 kB) every 1.5 s and a decode step's (7 kB) every 0.45 s:
# a direct hop's load in a burst across 200 ms (docs/benchmarks.md, 2026-12-07, evening)
CHUNKS = Load(pieces=22, chunks=14, gap=1.5, urgent_bytes=7000, urgent_every=0.45, urgents=46)

# the relay's splice for one session, from the sender to argv[1]; argv[2] "plain" takes its gate
# away; its streams' buffers as the relay's (BridgeServer.start)
RELAY = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[3])
from worker_core import bridge_server
from worker_core.bridge_server import GATED_CHUNK, BridgeLimits, BridgeServer

if sys.argv[2] == "plain":
    bridge_server.gate = lambda *_: None

async def main():
    server, done = BridgeServer(BridgeLimits()), asyncio.Event()

    async def session(reader, writer):
        far_reader, far_writer = await asyncio.open_connection(sys.argv[1], PORT, limit=GATED_CHUNK)
        await server._splice("session", reader, writer, far_reader, far_writer)
        done.set()

    listening = await asyncio.start_server(session, "0.0.0.0", PORT, limit=GATED_CHUNK)
    print("ready", flush=True)
    await asyncio.wait_for(done.wait(), 120)
    listening.close()

asyncio.run(main())
""".replace("PORT", str(PORT))

# one round trip over a path, then what the connection's own TCP_INFO says of it (the gate's reading)
RTT_PROBE = r"""
import socket, sys
sys.path.insert(0, sys.argv[3])
from worker_core.inflight import min_round_trip
if sys.argv[1] == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", PORT + 1)); s.listen(); print("ready", flush=True)
    c, _ = s.accept(); c.sendall(c.recv(16)); c.close()
else:
    c = socket.create_connection((sys.argv[2], PORT + 1), timeout=10); c.sendall(b"ping"); c.recv(16)
    print(min_round_trip(c))
""".replace("PORT", str(PORT))

Figures = dict[str, Any]  # {"late": [seconds, ...], "bulk_rate": bytes/s, "chunks": [seconds, ...]}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def _ready(proc: subprocess.Popen, what: str) -> None:
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        raise LabError(f"the probe's {what} did not start")


def _python(program: str, *args: str) -> list[str]:
    return [sys.executable, "-c", program, *args]


def _sends(
    hosts: Hosts,
    receiver: str,
    to: str,
    sender: str,
    sender_modes: Sequence[str],
    relay: tuple[str, str] | None = None,
    relay_modes: Sequence[str] | None = None,
    load: Load = ONE_BULK,
    congestion: str = "cubic",
) -> list[Figures]:
    """One receiver on ``receiver``; per entry of ``sender_modes`` one sender run on ``sender`` to
    address ``to`` (through a relay program on ``relay[0]`` forwarding to ``relay[1]``, in that
    entry's ``relay_modes`` mode, where given).  Every program started is stopped."""
    rx = hosts.spawn(receiver, _python(RECEIVER, str(len(sender_modes))), stdout=subprocess.PIPE, text=True)
    procs = [rx]
    out: list[Figures] = []
    try:
        _ready(rx, "receiver")
        for i, mode in enumerate(sender_modes):
            forward = None
            if relay is not None and relay_modes is not None:
                forward = hosts.spawn(relay[0], _python(RELAY, relay[1], relay_modes[i], str(ROOT)),
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
                procs.append(forward)
                _ready(forward, "relay")
            hosts.run(sender, _python(SENDER, to, mode, str(ROOT), json.dumps(asdict(load)), congestion), timeout=120)
            assert rx.stdout is not None
            out.append(json.loads(rx.stdout.readline()))
            if forward is not None and forward.wait(10) != 0:
                raise LabError(f"the relay ended with {forward.returncode}")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)
    return out


def _by_mode(figures: list[Figures], modes: Sequence[str] = MODES) -> dict[str, list[Figures]]:
    """Figures of runs made in the order of ``modes``, round after round, per mode."""
    return {m: figures[i :: len(modes)] for i, m in enumerate(modes)}


def router(rounds: int = 1, congestion: str = "cubic") -> dict[str, list[Figures]]:
    """Per mode, one :data:`Figures` per round through a home router's 20 Mbit/s uplink."""
    topo = Topology((Home("a", ("a",)),), ("pub",), "one home and a public host")
    with Lab.up("gprouter", topo, mbps=20) as lab:
        figures = _sends(lab, "pub", lab.address("pub"), "a", list(MODES) * rounds, congestion=congestion)
    return _by_mode(figures)


def line(
    delay_s: float = 0.1,
    mbps: float = 20.0,
    rounds: int = 1,
    load: Load = ONE_BULK,
    congestion: str = "cubic",
    modes: Sequence[str] = MODES,
) -> dict[str, Any]:
    """Per mode of ``modes``, one :data:`Figures` per round of ``load`` across a delay line;
    ``rtt``: the round trip TCP itself measured on it (seconds)."""
    got: dict[str, Any] = {}
    with DelayLine("gpline", delay_s, mbps) as dl:
        echo = dl.spawn("b", _python(RTT_PROBE, "serve", "", str(ROOT)), stdout=subprocess.PIPE, text=True)
        try:
            _ready(echo, "echo")
            got["rtt"] = float(dl.run("a", _python(RTT_PROBE, "dial", B_ADDRESS, str(ROOT)), timeout=30).stdout)
        finally:
            echo.kill()
            echo.wait(5)
        figures = _sends(dl, "b", B_ADDRESS, "a", list(modes) * rounds, load=load, congestion=congestion)
    return got | _by_mode(figures, modes)


def relay(
    slowest: tuple[str, ...] = ("b", "relay"), rounds: int = 1, congestion: str = "cubic"
) -> dict[str, dict[str, list[Figures]]]:
    """Per slowest link (``b``, ``relay``) and relay mode, one :data:`Figures` per round: a
    sender, a relay and a receiver on the lab's internet (see the module docstring)."""
    topo = Topology((), ("a", "relay", "b"), "a sender, a relay and a receiver on the internet")
    nodes = plan(topo)
    got: dict[str, dict[str, list[Figures]]] = {}
    with Lab.up("gprelay", topo, mbps=20) as lab:
        for slow in slowest:
            for host in ("b", "relay"):  # the internet's side of the host's link
                mbps = 10 if host == slow else 20
                lab.run("inet", ["tc", "qdisc", "change", "dev", nodes[host].ifaces[0].peer_name, "root", "tbf",
                                 "rate", f"{mbps}mbit", "burst", "64kb", "latency", "200ms"])  # fmt: skip
            figures = _sends(lab, "b", lab.address("relay"), "a", ["gate"] * 2 * rounds,
                             relay=("relay", lab.address("b")), relay_modes=list(MODES) * rounds,
                             congestion=congestion)  # fmt: skip
            got[slow] = _by_mode(figures)
    return got


def _row(label: str, f: Figures, delay_s: float = 0.0, chunks: bool = False) -> str:
    late = [x - delay_s for x in f["late"]]
    waits = f"p50 {percentile(late, 0.5):6.3f} s  p90 {percentile(late, 0.9):6.3f} s  max {max(late, default=0):6.3f} s"
    row = f"{label:<28} n {len(late):>2}  {waits}  bulk {f['bulk_rate'] * 8e-6:5.1f} Mbit/s"
    if chunks:
        each = f["chunks"]
        row += f"  chunks p50 {percentile(each, 0.5):5.2f} s  max {max(each, default=0):5.2f} s (n {len(each)})"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.tools.netlab.gateprobe", description=(__doc__ or "").split("\n")[0])
    p.add_argument("probe", choices=("router", "line", "chunks", "relay"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=100.0, help="line, chunks: one way")
    p.add_argument("--mbps", type=float, default=20.0, help="line, chunks: the link's rate")
    p.add_argument("--slowest", default="b,relay", help="relay: b, relay (comma separated)")
    p.add_argument("--congestion", default="cubic", help="the sender's TCP congestion control (default %(default)s)")
    p.add_argument("--windows", action="store_true", help="line, chunks: also a sender as on Windows, emulated")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if (why := unavailable()) is not None:
        p.error(why)
    if args.rounds < 1:
        p.error("--rounds is at least 1")
    delay_s = 0.0  # subtracted from the urgent frames' waits printed (a delay line's one way)
    if args.probe == "router":
        got: Any = router(args.rounds, args.congestion)
        rows = [(f"{m} round {i + 1}", f) for m in MODES for i, f in enumerate(got[m])]
    elif args.probe in ("line", "chunks"):
        delay_s = args.delay_ms / 1000
        modes = MODES + WINDOWS_MODES if args.windows else MODES
        load = CHUNKS if args.probe == "chunks" else ONE_BULK
        got = line(delay_s, args.mbps, args.rounds, load, args.congestion, modes)
        print(f"TCP's round trip: {got['rtt']:.3f} s; urgent frames' waits beyond the line's {delay_s:.3f} s:")
        rows = [(f"{m} round {i + 1}", f) for m in modes for i, f in enumerate(got[m])]
    else:
        slowest = tuple(s for s in args.slowest.split(",") if s)
        if not slowest or set(slowest) - {"b", "relay"}:
            p.error("--slowest takes b, relay")
        got = relay(slowest, args.rounds, args.congestion)
        rows = [(f"slowest {s}, relay {m} {i + 1}", f) for s in got for m in MODES for i, f in enumerate(got[s][m])]
    for label, f in rows:
        print(_row(label, f, delay_s, chunks=args.probe == "chunks"))
    if args.out:
        Path(args.out).write_text(json.dumps({"probe": args.probe, "figures": got}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
