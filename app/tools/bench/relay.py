"""Measure the relay: its CPU and memory per relayed Mbit/s, on loopback.

Contract
--------
``python -m app.tools.bench.relay [--sessions 1,8] [--rates 0,50,200] [--seconds 5] [--out F]``
starts ``molink relay`` as its own process (so its CPU time and memory are its own: read from
``/proc/PID``, Linux only), registers a stand-in master here (:class:`~worker_core.bridge_host.
BridgeHost` with a fresh identity, whose relayed sockets discard what they receive), and for
each (sessions, rate) opens that many relayed sessions that each push bytes one way for
``seconds`` (rate 0: as fast as loopback goes; else Mbit/s per session, paced by the relay's
own per-session limit).  Per run it reports the bytes the sink counted, Mbit/s, the relay's CPU
seconds and CPU% of one core, CPU-seconds per relayed Gbit, and the relay's resident memory
(idle before the runs, and at the end of each run).  Writes JSON to ``--out`` and prints a table.
The sender and the sink run in this process and share the machine's cores with the relay.

``--tokens N`` instead times one stream on a real group: a paired master (``--model``, default
the embedded SmolLM2-135M) registered at the relay process, and one local worker holding every
layer, reaching the master directly, then through the relay; per path it reports the median
over ``--repeats`` of the wall time of N greedy tokens divided by N (an 8-token prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.proc.spawn import stop_processes

CHUNK = 64 * 1024


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one_run(relay: str, group: str, pid: int, sessions: int, seconds: float, counted: list[int]) -> dict:
    from worker_core.bridge_dial import open_bridged

    streams = [await open_bridged(relay, group=group) for _ in range(sessions)]
    await asyncio.sleep(0.2)
    block = os.urandom(CHUNK)
    counted[0] = 0
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    stop = t0 + seconds

    async def push(writer: asyncio.StreamWriter) -> None:
        while time.perf_counter() < stop:
            writer.write(block)
            await writer.drain()

    await asyncio.gather(*(push(w) for _, w in streams))
    took = time.perf_counter() - t0
    cpu = _cpu_seconds(pid) - cpu0
    received = counted[0]
    rss = _rss_mib(pid)
    for _, w in streams:
        w.close()
    mbit = received * 8 / 1e6
    return {
        "sessions": sessions,
        "seconds": round(took, 2),
        "mbit_per_s": round(mbit / took, 1),
        "relay_cpu_seconds": round(cpu, 3),
        "relay_cpu_percent": round(100 * cpu / took, 1),
        "relay_cpu_seconds_per_gbit": round(cpu / (mbit / 1000), 3) if mbit else None,
        "relay_cpu_percent_per_100_mbit_s": round(100 * cpu / took / (mbit / took / 100), 2) if mbit else None,
        "relay_rss_mib": round(rss, 1),
    }


async def _main(sessions: list[int], rates: list[float], seconds: float) -> dict:
    from worker_core.bridge_host import BridgeHost, BridgeState
    from worker_core.identity import load_or_create

    counted = [0]
    sinks: set[asyncio.Task] = set()  # referenced: a pending task nobody holds may be collected

    async def sink(sock: socket.socket, label: str) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)

        async def drain() -> None:
            while data := await reader.read(CHUNK * 4):
                counted[0] += len(data)
            writer.close()

        task = asyncio.get_running_loop().create_task(drain())
        sinks.add(task)
        task.add_done_callback(sinks.discard)

    results = []
    idle_rss = {}
    with tempfile.TemporaryDirectory() as tmp:
        identity = load_or_create(Path(tmp) / "id", "bench")
        for rate in rates:
            port = _free_port()
            relay = f"127.0.0.1:{port}"
            per_session = rate if rate else 100000.0
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "relay", "--listen", relay, "--session-mbps", str(per_session),
                 "--total-mbps", "1000000", "--supervised"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                proc.stdout.readline()  # "relay listening on ..."
                host = BridgeHost(relay, identity, list, sink)
                await host.start()
                deadline = time.monotonic() + 20
                while host.state is not BridgeState.REGISTERED:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"could not register at the relay: {host.last_error}")
                    await asyncio.sleep(0.05)
                idle_rss[rate] = round(_rss_mib(proc.pid), 1)
                for n in sessions:
                    row = await _one_run(relay, identity.fingerprint, proc.pid, n, seconds, counted)
                    row["rate_limit_mbps_per_session"] = rate or None
                    results.append(row)
                    print(json.dumps(row), flush=True)
                await host.stop()
            finally:
                stop_processes([proc])  # the control channel first, a hard end only after the grace
    return {
        "what": "molink relay on loopback: one-way bytes pushed through N relayed sessions for a fixed time",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform},
        "relay_idle_rss_mib": idle_rss,
        "runs": results,
    }


async def _tokens(model: str, tokens: int, repeats: int) -> dict:
    import dataclasses
    import statistics

    from master_core.config import MasterConfig
    from master_core.request import SamplingParams
    from master_core.server import Master
    from worker_core.bridge_dial import BridgeForwarder
    from worker_core.identity import client_context, load_or_create
    from worker_core.pairing import join
    from worker_core.worker import WorkerConfig, serve

    port = _free_port()
    relay = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "relay", "--listen", relay, "--supervised"],
        stdin=subprocess.PIPE,  # the control channel: closing it asks the relay to stop
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        master = Master(
            MasterConfig(model=model, port=0, data_dir=f"{tmp}/m", group_host="127.0.0.1", group_port=0, relay=relay)
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            await master.start()
            assert master.group_port is not None
            ident = load_or_create(Path(tmp) / "w" / "identity", "w")
            joined = await join("127.0.0.1", master.group_port.port, master.new_code(), "w", ident.cert_pem)
            base = WorkerConfig(
                master=f"127.0.0.1:{master.group_port.port}",
                device="cpu",
                name="w",
                tls=client_context(ident, joined.master_cert),
                identity=ident,
                hop_bind="127.0.0.1",
                weights_dir=Path(tmp) / "w" / "weights",
                reconnect=False,
            )
            params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            prompt = [1, 2, 3, 4, 5, 6, 7, 8]
            for path in ("direct", "relayed"):
                forwarder = BridgeForwarder(relay, group=ident_fp(joined.master_cert)) if path == "relayed" else None
                if forwarder is not None:
                    await forwarder.start()
                cfg = dataclasses.replace(base, master=forwarder.address) if forwarder else base
                task = asyncio.create_task(serve(cfg))
                await asyncio.wait_for(master.group.wait_serving(), 600)
                await master.engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    await master.engine.generate(prompt, params)
                    times.append((time.perf_counter() - t0) / tokens * 1000)
                rows[path] = {"ms_per_token_median": round(statistics.median(times), 2), "runs_ms": times}
                print(path, json.dumps(rows[path]), flush=True)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if forwarder is not None:
                    await forwarder.stop()
                deadline = time.monotonic() + 30
                while master.group.links and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
        finally:
            await master.stop()
            stop_processes([proc])
    return {
        "what": f"one stream, {tokens} greedy tokens after an 8-token prompt, one local worker: direct vs relayed",
        "model": model,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "paths": rows,
    }


def ident_fp(pem: str) -> str:
    from worker_core.identity import fingerprint

    return fingerprint(pem)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m app.tools.bench.relay",
        description="Measure the relay: CPU and memory per relayed Mbit/s; time per token direct vs relayed.",
    )
    p.add_argument("--sessions", default="1,8", help="comma list of concurrent sessions")
    p.add_argument("--rates", default="0,50", help="comma list of Mbit/s per session (0: unlimited)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", default="bench-relay.json")
    p.add_argument("--tokens", type=int, default=0, help="time N tokens of one stream, direct vs relayed instead")
    p.add_argument("--model", default="default", help="with --tokens: checkpoint folder or 'default'")
    p.add_argument("--repeats", type=int, default=5, help="with --tokens: timed streams per path")
    args = p.parse_args(argv)
    if args.tokens:
        import logging

        logging.basicConfig(level=logging.WARNING)
        report = asyncio.run(_tokens(args.model, args.tokens, args.repeats))
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        return 0
    report = asyncio.run(
        _main([int(s) for s in args.sessions.split(",")], [float(r) for r in args.rates.split(",")], args.seconds)
    )
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
