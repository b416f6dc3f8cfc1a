"""`molink bench --speculative`, in the network lab: one paired group across homes, with and without speculation.

Contract
--------
``python -m app.tools.bench.lab_speculative --model M [--mbps 100] [--delay-ms 40] [--out F]`` (root)
builds the ``hops`` topology with every internet link shaped (tbf, both ways) and the given
one-way delay on TCP leaving each home, and runs one paired group there: the master on host
``a`` (home a, router with miniupnpd) with ``molink group create --min-workers 3``, and three
members that ``molink join`` by the link and run ``molink worker``: on ``a`` itself, on ``d``
(another home whose router maps) and on ``pub`` (a public host), so every hop and the
loop-back can go direct (each worker maps its hop port).  The group runs twice on the same
members and data: first without speculation, then with ``--speculative`` (the master started
again; the workers reconnect by themselves and keep their weights).  In each, every task of
:data:`app.tools.bench.speculative.TASKS` is asked once through the chat API (greedy, streamed,
``ANSWER_TOKENS`` at most), one at a time, by a client on ``a``.  It reports per task and mode
the decode tokens/s (tokens after the first over the time after the first chunk), the time to
the first chunk, the speed-up and whether both modes answered the same text; with the hops the
master reported.  As JSON on stdout (and in ``--out``).  Everything runs in the lab, which is
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.tools.netlab.joinbench import HEALTH, _drain, _line, _molink, _stop
from app.tools.netlab.lab import Lab

from .speculative import ANSWER_TOKENS, TASKS, _messages

HOSTS = ("a", "d", "pub")  # the members: the master's machine, another home whose router maps, a public host
API = "http://127.0.0.1:8000"
ASK_ONE = (
    "import json,sys,time,urllib.request\n"
    "api,messages,most=sys.argv[1],json.loads(sys.argv[2]),int(sys.argv[3])\n"
    "with urllib.request.urlopen(api+'/v1/models',timeout=10) as r: model=json.loads(r.read())['data'][0]['id']\n"
    "body={'model':model,'messages':messages,'max_tokens':most,'temperature':0,'stream':True,\n"
    "      'stream_options':{'include_usage':True}}\n"
    "req=urllib.request.Request(api+'/v1/chat/completions',data=json.dumps(body).encode(),\n"
    "                           headers={'Content-Type':'application/json'})\n"
    "t0=time.monotonic(); times=[]; text=''; used=None\n"
    "with urllib.request.urlopen(req,timeout=900) as r:\n"
    "    for raw in r:\n"
    "        line=raw.decode().strip()\n"
    "        if not line.startswith('data: ') or line=='data: [DONE]': continue\n"
    "        ev=json.loads(line[6:])\n"
    "        used=ev.get('usage') or used\n"
    "        for ch in ev.get('choices',[]):\n"
    "            piece=(ch.get('delta') or {}).get('content')\n"
    "            if piece: times.append(time.monotonic()-t0); text+=piece\n"
    "n=used['completion_tokens'] if used else len(times)\n"
    "print(json.dumps({'tokens':n,'ttft_s':times[0] if times else None,\n"
    "                  'decode_s':times[-1]-times[0] if len(times)>1 else 0.0,'text':text}))\n"
)
COUNTERS = ("molink_draft_trips_total", "molink_drafted_tokens_total", "molink_accepted_draft_tokens_total",
            "molink_loop_draft_trips_total")  # fmt: skip
METRICS = (
    "import sys,urllib.request\nprint(urllib.request.urlopen(sys.argv[1]+'/metrics',timeout=10).read().decode())\n"
)


def _group(lab: Lab, model: str, work: Path, speculative: bool) -> tuple[subprocess.Popen, str]:
    """Start the master on ``a`` (its data in ``work``); returns (process, the first join link)."""
    master = _molink(lab, "a", "group", "create", "--model", model, "--port", "7733", "--api-port", "8000",
                     "--data-dir", str(work / "master"), "--name", "spec", "--min-workers", str(len(HOSTS)),
                     *(["--speculative"] if speculative else []))  # fmt: skip
    link = _line(master, "Join link:", 300).split()[-1]
    _drain(master)
    return master, link


def _serving(lab: Lab, timeout: float) -> None:
    lab.run("a", [sys.executable, "-c", HEALTH, API, str(timeout)], timeout=timeout + 20)


def _new_link(lab: Lab, work: Path) -> str:
    out = lab.run("a", [sys.executable, "-m", "app.cli", "group", "code", "--data-dir", str(work / "master")]).stdout
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("Join link:"))


def _counters(lab: Lab) -> dict[str, float]:
    """The master's speculation counters (/metrics) and the bytes through ``pub``'s link."""
    text = lab.run("a", [sys.executable, "-c", METRICS, API]).stdout
    out = {
        name: float(line.split()[-1]) for line in text.splitlines() for name in COUNTERS if line.startswith(name + " ")
    }
    stats = "/sys/class/net/wan0/statistics/"
    rx, tx = lab.run("pub", ["cat", stats + "rx_bytes", stats + "tx_bytes"]).stdout.split()
    return out | {"pub_bytes": float(rx) + float(tx)}


def _ask(lab: Lab) -> dict:
    """Every task once, one at a time: its figures, and what the counters moved by meanwhile."""
    answers = {}
    for name in TASKS:
        before = _counters(lab)
        argv = [sys.executable, "-c", ASK_ONE, API, json.dumps(_messages(name)), str(ANSWER_TOKENS)]
        a = json.loads(lab.run("a", argv, timeout=900).stdout)
        moved = {k: v - before.get(k, 0.0) for k, v in _counters(lab).items()}
        trips = moved.get("molink_draft_trips_total", 0.0)
        a["decode_tokens_per_s"] = (a["tokens"] - 1) / a["decode_s"] if a["decode_s"] else None
        a["draft_trips"] = int(trips)
        a["loop_draft_trips"] = int(moved.get("molink_loop_draft_trips_total", 0.0))
        a["drafts_per_trip"] = moved.get("molink_drafted_tokens_total", 0.0) / trips if trips else 0.0
        a["accepted_per_trip"] = moved.get("molink_accepted_draft_tokens_total", 0.0) / trips if trips else 0.0
        a["pub_link_bytes_per_token"] = moved["pub_bytes"] / max(1, a["tokens"])
        answers[name] = a
    return answers


def _hops(lab: Lab, work: Path) -> list[str]:
    out = lab.run("a", [sys.executable, "-m", "app.cli", "group", "members", "--data-dir", str(work / "master")])
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def measure(lab: Lab, model: str, work: Path) -> dict:
    procs: list[subprocess.Popen] = []
    try:
        master, link = _group(lab, model, work, speculative=False)
        procs.append(master)
        for i, host in enumerate(HOSTS):
            how = link if i == 0 else _new_link(lab, work)
            lab.run(host, [sys.executable, "-m", "app.cli", "join", how, "--data-dir", str(work / host)], timeout=120)
            worker = _molink(lab, host, "worker", "--data-dir", str(work / host), "--device", "cpu", "--threads", "1")
            procs.append(worker)
            _drain(worker)
        t0 = time.monotonic()
        _serving(lab, 1800)
        serving_after = time.monotonic() - t0
        members = _hops(lab, work)
        modes = {"off": _ask(lab)}
        _stop([master])  # the same group again with speculation; the workers come back by themselves
        master, _ = _group(lab, model, work, speculative=True)
        procs.append(master)
        _serving(lab, 600)
        modes["speculative"] = _ask(lab)
        tasks = {}
        for name, (kind, _) in TASKS.items():
            off, on = modes["off"][name], modes["speculative"][name]
            speedup = on["decode_tokens_per_s"] / off["decode_tokens_per_s"] if off["decode_tokens_per_s"] else None
            tasks[name] = {
                "kind": kind,
                "off": {k: v for k, v in off.items() if k != "text"},
                "speculative": {k: v for k, v in on.items() if k != "text"},
                "speedup": round(speedup, 2) if speedup else None,
                "identical": off["text"] == on["text"],
            }
        return {"join_to_serving_seconds": round(serving_after, 1), "members": members, "tasks": tasks}
    finally:
        _stop(procs)


def table(result: dict) -> str:
    lines = [
        "| task | tokens | tok/s off | tok/s speculative | speed-up | TTFT off / spec (s) | drafts/trip "
        "| accepted/trip | trips drafted in the loop-back | KB/token on pub's link off / spec | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in result["tasks"].items():
        off, on = t["off"], t["speculative"]
        lines.append(
            f"| {name} ({t['kind']}) | {on['tokens']} | {off['decode_tokens_per_s'] or 0:.1f} | "
            f"{on['decode_tokens_per_s'] or 0:.1f} | {t['speedup'] or 0:.2f}x | "
            f"{off['ttft_s'] or 0:.2f} / {on['ttft_s'] or 0:.2f} | {on['drafts_per_trip']:.2f} | "
            f"{on['accepted_per_trip']:.2f} | {on['loop_draft_trips']} of {on['draft_trips']} | "
            f"{off['pub_link_bytes_per_token'] / 1e3:.1f} / {on['pub_link_bytes_per_token'] / 1e3:.1f} | "
            f"{t['identical']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="speculative decoding in the network lab: a group across homes")
    p.add_argument("--model", default="default")
    p.add_argument("--mbps", type=float, default=100.0)
    p.add_argument("--delay-ms", type=float, default=40.0, help="one way, on TCP leaving each home")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still take the lab down (finally, atexit)
    with Lab.up("sbench", "hops", mbps=args.mbps, delay_ms=args.delay_ms) as lab, tempfile.TemporaryDirectory() as w:
        result = {"mbps": args.mbps, "delay_ms_one_way": args.delay_ms, "model": args.model}
        result |= measure(lab, args.model, Path(w))
    text = json.dumps(result, indent=2)
    print(text)
    print(table(result), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
