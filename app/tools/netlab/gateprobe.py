"""Probe the in-flight gate (worker_core.inflight) and the relay's legs on real network stacks, in
a minute where a whole group's burst (:mod:`app.tools.netlab.burstlab`) takes four.

Contract
--------
``python -m app.tools.netlab.gateprobe {router,line,relay} [--rounds N] [--out F]`` (root, as
the lab) runs one sender of bulk bytes and small urgent frames per mode, as the links send them:
one TCP connection with CUBIC, the kernel's unsent bytes kept low
(:func:`worker_core.unsent.keep_unsent_low`), an :class:`~worker_core.outbox.Outbox` holding 6 MB
of bulk in 16 KiB pieces queued at once, and a 200-byte urgent frame every 50 ms (40 in all),
with the gate (``gate``) or without (``plain``).  The receiver reports each urgent frame's wait
(from its sending to its arrival; the two ends share this machine's clock) and the rate the bulk
crossed at.

* ``router``: one home's host sends to a public host through the home router's 20 Mbit/s uplink
  (``tbf``, a 200 ms queue) (:func:`router`).
* ``line``: across a delay line of TUN devices (:class:`~app.tools.netlab.tunlink.DelayLine`,
  ``--delay-ms`` one way, default 100, ``--mbps``, default 20), so TCP sees the round trip; the
  waits reported include the line's one-way delay (:func:`line`).
* ``relay``: a sender, a relay and a receiver on the lab's internet, every link 20 Mbit/s but the
  one ``--slowest`` names at 10 (``b``: the receiver's downlink, the relay's second leg;
  ``relay``: the relay's downlink, its first leg); the sender's outbox gated in both modes, the
  relay's splice (:meth:`worker_core.bridge_server.BridgeServer._splice`) with its gate
  (``gate``) or without (``plain``) (:func:`relay`).

Each round runs ``plain`` then ``gate``; it prints per round and mode the urgent frames' median
and p90 wait and the bulk's Mbit/s, and writes every figure as JSON to ``--out``.  The tests of
the gate (``tests/test_inflight.py``) call the same functions with one round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .lab import Hosts, Lab, LabError, unavailable
from .topology import Home, Topology, plan
from .tunlink import B_ADDRESS, DelayLine

ROOT = Path(__file__).resolve().parents[3]
PORT = 9000
MODES = ("plain", "gate")

# the receiver: argv[1] connections, one after another; per connection a JSON line with each urgent
# frame's wait and the bulk's bytes/s
RECEIVER = r"""
import json, socket, struct, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", PORT)); s.listen()
print("ready", flush=True)
for _ in range(int(sys.argv[1])):
    c, _ = s.accept(); buf = bytearray(); late = []; bulk = 0; t0 = t1 = None
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        buf += d
        while len(buf) >= 13:
            kind, sent, n = struct.unpack_from("!BdI", buf)
            if len(buf) < 13 + n:
                break
            del buf[:13 + n]
            if kind == 1:
                late.append(time.monotonic() - sent)
            else:
                t0 = t0 or time.monotonic(); bulk += n; t1 = time.monotonic()
    rate = bulk / max(1e-3, t1 - t0) if t0 is not None and t1 is not None else 0.0
    print(json.dumps({"late": late, "bulk_rate": rate}), flush=True)
    c.close()
""".replace("PORT", str(PORT))

# the sender: argv[1] the receiver's (or relay's) address, argv[2] "gate" or "plain", argv[3] the
# repository (as the module docstring says)
SENDER = r"""
import asyncio, socket, struct, sys, time
sys.path.insert(0, sys.argv[3])
from worker_core.inflight import room_of
from worker_core.outbox import Outbox
from worker_core.unsent import keep_unsent_low

async def main():
    reader, writer = await asyncio.open_connection(sys.argv[1], PORT)
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
    keep_unsent_low(writer.transport)

    async def ship(item):
        kind, payload = item
        writer.write(struct.pack("!BdI", kind, time.monotonic(), len(payload)) + payload)
        await writer.drain()

    box = Outbox(ship, room=room_of(writer.transport) if sys.argv[2] == "gate" else None)
    for _ in range(384):
        box.put((0, b"x" * 16384))
    for _ in range(40):
        await asyncio.sleep(0.05)
        box.put((1, b"u" * 200), urgent=True)
    await box.flush(30)
    await box.close()
    writer.close()
    await writer.wait_closed()

asyncio.run(main())
""".replace("PORT", str(PORT))

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

Figures = dict[str, Any]  # {"late": [seconds, ...], "bulk_rate": bytes/s}


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
            hosts.run(sender, _python(SENDER, to, mode, str(ROOT)), timeout=120)
            assert rx.stdout is not None
            out.append(json.loads(rx.stdout.readline()))
            if forward is not None and forward.wait(10) != 0:
                raise LabError(f"the relay ended with {forward.returncode}")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)
    return out


def router(rounds: int = 1) -> dict[str, list[Figures]]:
    """Per mode, one :data:`Figures` per round through a home router's 20 Mbit/s uplink."""
    topo = Topology((Home("a", ("a",)),), ("pub",), "one home and a public host")
    got: dict[str, list[Figures]] = {m: [] for m in MODES}
    with Lab.up("gprouter", topo, mbps=20) as lab:
        figures = _sends(lab, "pub", lab.address("pub"), "a", list(MODES) * rounds)
    for i, f in enumerate(figures):
        got[MODES[i % 2]].append(f)
    return got


def line(delay_s: float = 0.1, mbps: float = 20.0, rounds: int = 1) -> dict[str, Any]:
    """Per mode, one :data:`Figures` per round across a delay line; ``rtt``: the round trip TCP
    itself measured on it (seconds)."""
    got: dict[str, Any] = {m: [] for m in MODES}
    with DelayLine("gpline", delay_s, mbps) as dl:
        echo = dl.spawn("b", _python(RTT_PROBE, "serve", "", str(ROOT)), stdout=subprocess.PIPE, text=True)
        try:
            _ready(echo, "echo")
            got["rtt"] = float(dl.run("a", _python(RTT_PROBE, "dial", B_ADDRESS, str(ROOT)), timeout=30).stdout)
        finally:
            echo.kill()
            echo.wait(5)
        figures = _sends(dl, "b", B_ADDRESS, "a", list(MODES) * rounds)
    for i, f in enumerate(figures):
        got[MODES[i % 2]].append(f)
    return got


def relay(slowest: tuple[str, ...] = ("b", "relay"), rounds: int = 1) -> dict[str, dict[str, list[Figures]]]:
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
                             relay=("relay", lab.address("b")), relay_modes=list(MODES) * rounds)  # fmt: skip
            got[slow] = {m: figures[i::2] for i, m in enumerate(MODES)}
    return got


def _row(label: str, f: Figures) -> str:
    late = f["late"]
    waits = f"p50 {percentile(late, 0.5):6.3f} s  p90 {percentile(late, 0.9):6.3f} s"
    return f"{label:<28} n {len(late):>2}  {waits}  bulk {f['bulk_rate'] * 8e-6:5.1f} Mbit/s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.tools.netlab.gateprobe", description=(__doc__ or "").split("\n")[0])
    p.add_argument("probe", choices=("router", "line", "relay"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=100.0, help="line: one way")
    p.add_argument("--mbps", type=float, default=20.0, help="line: the link's rate")
    p.add_argument("--slowest", default="b,relay", help="relay: b, relay (comma separated)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if (why := unavailable()) is not None:
        p.error(why)
    if args.rounds < 1:
        p.error("--rounds is at least 1")
    if args.probe == "router":
        got: Any = router(args.rounds)
        rows = [(f"{m} round {i + 1}", f) for m in MODES for i, f in enumerate(got[m])]
    elif args.probe == "line":
        got = line(args.delay_ms / 1000, args.mbps, args.rounds)
        print(f"TCP's round trip: {got['rtt']:.3f} s")
        rows = [(f"{m} round {i + 1}", f) for m in MODES for i, f in enumerate(got[m])]
    else:
        slowest = tuple(s for s in args.slowest.split(",") if s)
        if not slowest or set(slowest) - {"b", "relay"}:
            p.error("--slowest takes b, relay")
        got = relay(slowest, args.rounds)
        rows = [(f"slowest {s}, relay {m} {i + 1}", f) for s in got for m in MODES for i, f in enumerate(got[s][m])]
    for label, f in rows:
        print(_row(label, f))
    if args.out:
        Path(args.out).write_text(json.dumps({"probe": args.probe, "figures": got}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
