"""Measure, in the network lab, the time from ``molink join`` to a group serving, per path.

Contract
--------
``python -m app.tools.netlab.joinbench --model M [--mbps 50] [--delay-ms 20] [--out F]``
(root) builds the ``upnp`` topology with every internet link shaped (tbf, both ways) and the
given one-way delay on TCP leaving each home, then for each path runs a fresh group: the
master on host ``a`` (home a, router with miniupnpd) with ``molink group create``, and one
friend who runs ``molink join LINK`` then ``molink worker``:

* ``lan``: the friend is ``a2``, on a's LAN (not shaped, no delay);
* ``mapped``: the friend is ``b`` in another home, reaching the port a's router mapped;
* ``relayed``: ``molink relay`` runs on ``pub`` (its link shaped like the others), the master
  registers there (``--relay``), the friend ``b`` pairs with ``molink join CODE --relay R``
  (the code alone, found by its nameplate) and serves with ``molink worker --via-relay`` (its
  race would otherwise take the mapped port): every byte crosses pub's link twice, and each
  side's router adds its delay (both sides dial out).

It reports, per path: seconds for ``molink join`` (pairing), from the start of ``join`` until the
master's ``/health`` answers 200 (weights delivered and loaded), the first answer's time, the
address the friend paired with, the model's weight bytes and the machine's load average; with
``--tokens N``, the median wall time per token of one stream (``--repeats`` runs of N greedy
tokens) and the tokens per second of 8 streams at once; for ``relayed``, the relay process's CPU
seconds and resident memory (``/proc``) and the bytes through pub's link
(``/sys/class/net/wan0/statistics``) while the weights were delivered and while the streams
ran, so CPU per relayed Mbit/s.  As JSON on stdout (and in ``--out``).  Everything runs in the
lab, which is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .lab import Hosts, Lab

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


STREAMS = (
    "import json,sys,time,urllib.request\n"
    "from concurrent.futures import ThreadPoolExecutor\n"
    "api,n,tokens=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])\n"
    "with urllib.request.urlopen(api+'/v1/models',timeout=10) as r: model=json.loads(r.read())['data'][0]['id']\n"
    "def one(i):\n"
    "    body={'model':model,'prompt':[5+i,6,7,8,9,10,11,12],'max_tokens':tokens,'temperature':0,'ignore_eos':True}\n"
    "    req=urllib.request.Request(api+'/v1/completions',data=json.dumps(body).encode(),"
    "headers={'Content-Type':'application/json'})\n"
    "    with urllib.request.urlopen(req,timeout=600) as r: return json.loads(r.read())['usage']['completion_tokens']\n"
    "t=time.monotonic()\n"
    "with ThreadPoolExecutor(n) as ex: done=sum(ex.map(one,range(n)))\n"
    "print(time.monotonic()-t, done)\n"
)


def _streams(lab: Lab, n: int, tokens: int, host: str = "a") -> tuple[float, int]:
    """(seconds, tokens) of ``n`` streams of ``tokens`` greedy tokens at once, asked on ``host``."""
    out = lab.run(host, [sys.executable, "-c", STREAMS, "http://127.0.0.1:8000", str(n), str(tokens)], timeout=900)
    took, done = out.stdout.split()
    return float(took), int(done)


class _Relay:
    """The relay process's CPU seconds and RSS, and the bytes through pub's link."""

    def __init__(self, lab: Lab, pid: int) -> None:
        self.lab, self.pid = lab, pid

    def sample(self) -> dict:
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:")) / 1024  # fmt: skip
        counters = self.lab.run("pub", ["cat", "/sys/class/net/wan0/statistics/rx_bytes",
                                        "/sys/class/net/wan0/statistics/tx_bytes"]).stdout.split()  # fmt: skip
        return {"t": time.monotonic(), "cpu": cpu, "rss_mib": rss, "rx": int(counters[0]), "tx": int(counters[1])}

    @staticmethod
    def between(a: dict, b: dict) -> dict:
        took = b["t"] - a["t"]
        relayed_mbit = (b["rx"] - a["rx"]) * 8 / 1e6  # each relayed byte comes in once (and goes out once)
        cpu = b["cpu"] - a["cpu"]
        rate = relayed_mbit / took if took else 0.0
        return {
            "seconds": round(took, 2),
            "relayed_mbit_per_s": round(rate, 2),
            "link_in_bytes": b["rx"] - a["rx"],
            "link_out_bytes": b["tx"] - a["tx"],
            "relay_cpu_seconds": round(cpu, 3),
            "relay_cpu_percent_of_one_core": round(100 * cpu / took, 2) if took else None,
            "relay_cpu_percent_per_relayed_mbit_s": round(100 * cpu / took / rate, 3) if rate else None,
            "relay_rss_mib": round(b["rss_mib"], 1),
        }


def _molink(lab: Hosts, host: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return lab.spawn(host, [sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))  # fmt: skip


def _line(proc: subprocess.Popen, prefix: str, timeout: float, seen: list[str] | None = None) -> str:
    """The first line of ``proc``'s output starting with ``prefix``; the lines before it go to ``seen``."""
    assert proc.stdout is not None  # noqa: S101 - spawned with a pipe
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
        if seen is not None:
            seen.append(line)
    raise RuntimeError(f"the master printed no {prefix!r} line")


def _drain(proc: subprocess.Popen, keep: Path | None = None) -> None:
    """Keep reading ``proc``'s output (its log) so that a full pipe never blocks it; with ``keep``,
    each line is written there as it comes (the file can be read while it runs)."""
    out = proc.stdout
    if out is None:
        return

    def read() -> None:
        if keep is None:
            all(True for _ in out)
            return
        with keep.open("w") as f:
            for line in out:
                f.write(line)
                f.flush()

    threading.Thread(target=read, daemon=True).start()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def measure(lab: Lab, model: str, friend: str, work: Path, relay: str = "", relay_pid: int = 0,
            tokens: int = 0, repeats: int = 3) -> dict:  # fmt: skip
    procs: list[subprocess.Popen] = []
    meter = _Relay(lab, relay_pid) if relay else None
    try:
        extra = ["--relay", relay] if relay else []
        master = _molink(lab, "a", "group", "create", "--model", model, "--port", "7733", "--api-port", "8000",
                         "--data-dir", str(work / "master"), "--name", "bench", *extra)  # fmt: skip
        procs.append(master)
        code = _line(master, "Pairing code:", 300).split()[-1]
        link = _line(master, "Join link:", 60).split()[-1]
        _drain(master)
        before = meter.sample() if meter else None
        t0 = time.time()
        how = [code, "--relay", relay] if relay else [link]
        for attempt in range(20):  # a relay may not know the group for a moment after the code is printed
            joined = lab.run(friend, [sys.executable, "-m", "app.cli", "join", *how, "--data-dir", str(work / friend)],
                             timeout=120, check=not relay or attempt == 19)  # fmt: skip
            if joined.returncode == 0:
                break
            time.sleep(0.5)
        t_join = time.time() - t0
        worker = _molink(lab, friend, "worker", "--data-dir", str(work / friend), "--device", "cpu",
                         *(["--via-relay"] if relay else []))  # fmt: skip
        procs.append(worker)
        _drain(worker)
        up = lab.run("a", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "900"], timeout=920)
        t_serving = float(up.stdout.strip()) - t0
        served = meter.sample() if meter else None
        ask = lab.run("a", [sys.executable, "-c", ASK, "http://127.0.0.1:8000"], timeout=320).stdout.split()
        membership = json.loads((work / friend / "membership.json").read_text())
        weights = sum(f.stat().st_size for f in (work / friend / "weights").rglob("*") if f.is_file())
        out = {
            "load_average_1m": round(os.getloadavg()[0], 1),  # this machine's, at the end: CPU contention shows here
            "friend": friend,
            "paired_with": f"{membership['master_host']}:{membership['master_port']}"
            if membership["master_host"]
            else f"relay {membership['relay']}",
            "join_seconds": round(t_join, 2),
            "join_to_serving_seconds": round(t_serving, 2),
            "first_answer_seconds": round(float(ask[0]), 2),
            "answer_tokens": int(ask[1]),
            "weight_bytes_delivered": weights,
            "join_output": joined.stdout.strip()[:200],
        }
        if meter and before and served:
            out["relay_join_to_serving"] = _Relay.between(before, served)
        if tokens:
            runs = sorted(_streams(lab, 1, tokens) for _ in range(repeats))
            per_token = sorted(took / max(1, done) for took, done in runs)
            start = meter.sample() if meter else None
            took8, done8 = _streams(lab, 8, tokens)
            end = meter.sample() if meter else None
            out |= {
                "single_stream_ms_per_token_median": round(1000 * per_token[len(per_token) // 2], 1),
                "single_stream_ms_per_token_runs": [round(1000 * x, 1) for x in per_token],
                "eight_streams_tokens_per_s": round(done8 / took8, 2),
                "eight_streams_tokens": done8,
            }
            if start and end:
                out["relay_eight_streams"] = _Relay.between(start, end)
        out["load_average_1m_end"] = round(os.getloadavg()[0], 1)
        return out
    finally:
        _stop(procs)


def report(results: dict, out: str | None) -> None:
    """Print ``results`` as JSON, and write it to ``out`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="time from molink join to serving, per path, in the network lab")
    p.add_argument("--model", default="default")
    p.add_argument("--mbps", type=float, default=50.0)
    p.add_argument("--delay-ms", type=float, default=20.0, help="one way, each direction (RTT + 2x)")
    p.add_argument("--paths", default="lan,mapped", help="lan, mapped, relayed (comma separated)")
    p.add_argument("--tokens", type=int, default=0, help="also time N-token streams: 1 stream, then 8 at once")
    p.add_argument("--repeats", type=int, default=3, help="single-stream runs (the median is reported)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still take the lab down (finally, atexit)
    friends = {"lan": "a2", "mapped": "b", "relayed": "b"}
    results: dict = {"mbps": args.mbps, "delay_ms_one_way": args.delay_ms, "model": args.model, "paths": {}}
    with Lab.up("jbench", "upnp", mbps=args.mbps, delay_ms=args.delay_ms) as lab:
        relay = None
        try:
            for path in args.paths.split(","):
                if path == "relayed" and relay is None:
                    relay = _molink(lab, "pub", "relay", "--listen", "0.0.0.0:7735")
                    _line(relay, "relay listening", 60)
                    _drain(relay)
                    idle = _Relay(lab, relay.pid).sample()
                    results["relay_idle_rss_mib"] = round(idle["rss_mib"], 1)
                with tempfile.TemporaryDirectory() as work:
                    results["paths"][path] = measure(
                        lab, args.model, friends[path], Path(work),
                        relay=f"{lab.address('pub')}:7735" if path == "relayed" else "",
                        relay_pid=relay.pid if relay is not None else 0, tokens=args.tokens, repeats=args.repeats,
                    )  # fmt: skip
                print(json.dumps({path: results["paths"][path]}), file=sys.stderr, flush=True)
        finally:
            if relay is not None:
                _stop([relay])
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
