"""Measure, in the network lab, a hop between two stages through the relay against the same hop
through the master.

Contract
--------
``python -m app.tools.netlab.hopbench --model M [--mbps 50] [--delay-ms 20] [--tokens 32]
[--repeats 3] [--out F]`` (root) builds the ``relayhops`` topology with every internet link
shaped (tbf, both ways) and the given one-way delay on TCP leaving each home, runs ``molink
relay`` on ``pub``, and for each way runs a fresh group: the master on host ``c`` (behind a
carrier-grade NAT: it registers at the relay with ``--relay``, members reach it only through
there) and one member in each of homes ``s`` and ``t`` (symmetric NATs, nothing mapped), each
paired with the join link (``molink join LINK``) and serving with ``molink worker``:

* ``relay``: the workers as they are (each registers its hop listener at the relay; the hop and
  the loop-back go through it: two legs);
* ``master``: the workers with ``--no-direct`` (every hop through the master, which is itself
  behind the relay: four legs), what a group did before hops could take the relay.

It reports, per way: the hops as the master's ``/health`` describes them, the median wall time
per token of one stream (``--repeats`` runs of ``--tokens`` greedy tokens, 8-token prompt,
``/v1/completions`` asked on c), the tokens per second of 8 streams at once, the bytes into
pub's link (each relayed byte enters once) while those ran, and the machine's load average.
As JSON on stdout (and in ``--out``).  Everything runs in the lab, which is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .joinbench import HEALTH, _drain, _line, _molink, _stop, _streams, report
from .lab import Lab

RELAY_PORT = 7735
WORKERS = (
    "import json,sys,urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1]+'/health',timeout=10) as r:\n"
    "    print(json.dumps([[w['name'],w['stage'],w['next_hop']] for w in json.loads(r.read())['workers']]))\n"
)


def _link_in(lab: Lab) -> int:
    return int(lab.run("pub", ["cat", "/sys/class/net/wan0/statistics/rx_bytes"]).stdout)


def measure(lab: Lab, model: str, relay: str, work: Path, way: str, tokens: int, repeats: int) -> dict:
    procs: list[subprocess.Popen] = []
    try:
        master = _molink(lab, "c", "group", "create", "--model", model, "--port", "7733", "--api-port", "8000",
                         "--data-dir", str(work / "m"), "--name", "hopbench", "--min-workers", "2",
                         "--no-port-mapping", "--relay", relay)  # fmt: skip
        procs.append(master)
        _line(master, "Pairing code:", 300)
        _drain(master)
        time.sleep(2)  # registered at the relay (it reports that in its log only)
        for name, home in (("ws", "s"), ("wt", "t")):
            code = lab.run("c", [sys.executable, "-m", "app.cli", "group", "code", "--data-dir", str(work / "m")])
            link = next(x for x in code.stdout.splitlines() if x.startswith("Join link:")).split()[-1]
            lab.run(home, [sys.executable, "-m", "app.cli", "join", link, "--data-dir", str(work / name),
                           "--name", name], timeout=120)  # fmt: skip
            worker = _molink(lab, home, "worker", "--data-dir", str(work / name), "--device", "cpu", "--threads", "1",
                             *(["--no-direct"] if way == "master" else []))  # fmt: skip
            procs.append(worker)
            _drain(worker)
        lab.run("c", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "600"], timeout=620)
        hops = json.loads(lab.run("c", [sys.executable, "-c", WORKERS, "http://127.0.0.1:8000"]).stdout)
        runs = sorted(_streams(lab, 1, tokens, host="c") for _ in range(repeats))
        per_token = sorted(took / max(1, done) for took, done in runs)
        before = _link_in(lab)
        took8, done8 = _streams(lab, 8, tokens, host="c")
        return {
            "hops": hops,
            "single_stream_ms_per_token_median": round(1000 * per_token[len(per_token) // 2], 1),
            "single_stream_ms_per_token_runs": [round(1000 * x, 1) for x in per_token],
            "eight_streams_tokens_per_s": round(done8 / took8, 2),
            "eight_streams_relay_link_in_bytes": _link_in(lab) - before,
            "load_average_1m": round(os.getloadavg()[0], 1),
        }
    finally:
        _stop(procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a hop through the relay against the same hop through the master")
    p.add_argument("--model", default="default")
    p.add_argument("--mbps", type=float, default=50.0)
    p.add_argument("--delay-ms", type=float, default=20.0, help="one way, each direction, on each home's router")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="single-stream runs (the median is reported)")
    p.add_argument("--ways", default="relay,master", help="relay, master (comma separated, in this order)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still take the lab down (finally, atexit)
    results: dict = {"mbps": args.mbps, "delay_ms_one_way": args.delay_ms, "model": args.model, "ways": {}}
    with Lab.up("hbench", "relayhops", mbps=args.mbps, delay_ms=args.delay_ms) as lab:
        relay_proc = _molink(lab, "pub", "relay", "--listen", f"0.0.0.0:{RELAY_PORT}")
        try:
            _line(relay_proc, "relay listening", 60)
            _drain(relay_proc)
            relay = f"{lab.address('pub')}:{RELAY_PORT}"
            for way in args.ways.split(","):
                with tempfile.TemporaryDirectory() as work:
                    results["ways"][way] = measure(lab, args.model, relay, Path(work), way, args.tokens, args.repeats)
                print(json.dumps({way: results["ways"][way]}), file=sys.stderr, flush=True)
        finally:
            _stop([relay_proc])
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
