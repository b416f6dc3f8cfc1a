"""Measure, in the network lab, the time from ``molink join`` to a group serving, per path.

Contract
--------
``python -m app.tools.netlab.joinbench --model M [--mbps 50] [--delay-ms 20] [--out F]``
(root) builds the ``upnp`` topology with every internet link shaped (tbf, both ways) and the
given one-way delay on TCP leaving each home, then for each path runs a fresh group: the
master on host ``a`` (home a, router with miniupnpd) with ``molink group create``, and one
friend who runs ``molink join LINK`` then ``molink worker``:

* ``lan``: the friend is ``a2``, on a's LAN (not shaped, no delay);
* ``mapped``: the friend is ``b`` in another home, reaching the port a's router mapped.

It reports, per path: seconds for ``molink join`` (pairing), from the start of ``join`` until the
master's ``/health`` answers 200 (weights delivered and loaded), the first answer's time, the
address the friend paired with, the model's weight bytes and the machine's load average; as JSON on stdout (and in
``--out``).  Everything runs in the lab, which is removed at the end.
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

from .lab import Lab

ROOT = Path(__file__).resolve().parents[3]
HEALTH = (
    "import sys,time,urllib.request,urllib.error\n"
    "deadline=time.monotonic()+float(sys.argv[2])\n"
    "while time.monotonic()<deadline:\n"
    "    try:\n"
    "        urllib.request.urlopen(sys.argv[1]+'/health',timeout=5); print(time.time()); break\n"
    "    except (urllib.error.URLError, OSError): time.sleep(0.2)\n"
    "else: sys.exit(1)\n"
)
ASK = (
    "import json,sys,time,urllib.request\n"
    "api=sys.argv[1]\n"
    "with urllib.request.urlopen(api+'/v1/models',timeout=10) as r: model=json.loads(r.read())['data'][0]['id']\n"
    "body={'model':model,'messages':[{'role':'user','content':'hello'}],'max_tokens':16,'temperature':0}\n"
    "t=time.monotonic()\n"
    "req=urllib.request.Request(api+'/v1/chat/completions',data=json.dumps(body).encode(),"
    "headers={'Content-Type':'application/json'})\n"
    "with urllib.request.urlopen(req,timeout=300) as r: u=json.loads(r.read())['usage']\n"
    "print(time.monotonic()-t, u['completion_tokens'])\n"
)


def _molink(lab: Lab, host: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return lab.spawn(host, [sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))  # fmt: skip


def _line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    assert proc.stdout is not None  # noqa: S101 - spawned with a pipe
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"the master printed no {prefix!r} line")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def measure(lab: Lab, model: str, friend: str, work: Path) -> dict:
    procs: list[subprocess.Popen] = []
    try:
        master = _molink(lab, "a", "group", "create", "--model", model, "--port", "7733", "--api-port", "8000",
                         "--data-dir", str(work / "master"), "--name", "bench")  # fmt: skip
        procs.append(master)
        _line(master, "Pairing code:", 300)
        link = _line(master, "Join link:", 60).split()[-1]
        t0 = time.time()
        joined = lab.run(friend, [sys.executable, "-m", "app.cli", "join", link, "--data-dir", str(work / friend)],
                         timeout=120)  # fmt: skip
        t_join = time.time() - t0
        worker = _molink(lab, friend, "worker", "--data-dir", str(work / friend), "--device", "cpu")
        procs.append(worker)
        up = lab.run("a", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "900"], timeout=920)
        t_serving = float(up.stdout.strip()) - t0
        ask = lab.run("a", [sys.executable, "-c", ASK, "http://127.0.0.1:8000"], timeout=320).stdout.split()
        membership = json.loads((work / friend / "membership.json").read_text())
        weights = sum(f.stat().st_size for f in (work / friend / "weights").rglob("*") if f.is_file())
        return {
            "load_average_1m": round(os.getloadavg()[0], 1),  # this machine's, at the end: CPU contention shows here
            "friend": friend,
            "paired_with": f"{membership['master_host']}:{membership['master_port']}",
            "join_seconds": round(t_join, 2),
            "join_to_serving_seconds": round(t_serving, 2),
            "first_answer_seconds": round(float(ask[0]), 2),
            "answer_tokens": int(ask[1]),
            "weight_bytes_delivered": weights,
            "join_output": joined.stdout.strip()[:200],
        }
    finally:
        _stop(procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="time from molink join to serving, per path, in the network lab")
    p.add_argument("--model", default="default")
    p.add_argument("--mbps", type=float, default=50.0)
    p.add_argument("--delay-ms", type=float, default=20.0, help="one way, each direction (RTT + 2x)")
    p.add_argument("--paths", default="lan,mapped")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still take the lab down (finally, atexit)
    friends = {"lan": "a2", "mapped": "b"}
    results: dict = {"mbps": args.mbps, "delay_ms_one_way": args.delay_ms, "model": args.model, "paths": {}}
    with Lab.up("jbench", "upnp", mbps=args.mbps, delay_ms=args.delay_ms) as lab:
        for path in args.paths.split(","):
            with tempfile.TemporaryDirectory() as work:
                results["paths"][path] = measure(lab, args.model, friends[path], Path(work))
            print(json.dumps({path: results["paths"][path]}), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
