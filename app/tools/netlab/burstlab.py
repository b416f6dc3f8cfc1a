"""A burst of long prompts over streams, on a group whose stages sit in other homes (the network lab).

Contract
--------
``python -m app.tools.netlab.burstlab [--model M] [--mbps 20] [--delay-ms 0] [--congestion cubic] [--line]
[--hops relayed,direct] [--streams 3] [--prompts 1300,1300,1300] [--spacing 1.5] [--calm 10] [--out F]
[--steps PREFIX]`` (root) builds the ``hops`` topology (homes a and d behind routers with miniupnpd,
home b behind one without, every internet link shaped with tbf both ways, ``--delay-ms`` one way
added to TCP leaving each home by the routers' delay proxies, every host's TCP with
``--congestion``) and, per hop mode, runs a fresh group: the master on host ``a``
(``molink group create``, serving once 2 workers joined), and two friends who each run ``molink
join LINK`` then ``molink worker`` (``relayed``: ``d`` and ``b``, with ``--no-direct``, so the hop
between the two stages goes through the master on a, and a's link carries every activation
twice; ``direct``: ``d`` and ``a`` itself, whose routers both map ports, so the stages dial
each other; each offers 0.5 GB, so that neither holds the default model alone: the report's
``pipeline`` says how many stages served and how each hop went).  When the group serves, a client on ``a``
opens ``--streams`` greedy streams through the OpenAI API (``/v1/completions``, token-id prompts,
SSE), and after ``--calm`` seconds sends the long prompts (random token ids, ``max_tokens`` 1)
``--spacing`` seconds apart.  Per mode it reports, from each stream's token arrival times: the
calm gap median (gaps before the first long prompt), the gaps' p50 and p99 while the burst lasts
(from the first long prompt's arrival to the last one's answer), their ratio to the calm median
(issue 26's headline, aim at most 2.5), each long prompt's time to its answer, the pipeline
the master last said it served (its stages and whether each hop between them is direct), and from
the master's step timelines the links' share of the burst's decode steps (``burst_links``: wall
time minus the stages' holds, p50 / p90 / p99).  As JSON on
stdout (and in ``--out``); with ``--steps``, each mode's token times and the master's step timelines
(``/dashboard/api/steps``, on the client's monotonic clock: one kernel) and the cost model's fit at
the end in ``PREFIX.MODE.json``.
With ``--line``, the homes are two, joined by a :class:`~app.tools.netlab.tunlink.DelayLine`
(``--delay-ms`` one way and ``--mbps`` each way inside every TCP connection, so the senders see the
round trip, as the in-flight gate reads it): the master and one stage on ``a``, the other stage on
``b``, each offering 0.5 GB; every step crosses the line twice in either hop mode.  The line's
copying thread runs in this process, on the same cores as the group.
Everything runs in the lab, which is removed at the end, also on failure.

The policy is the master's default (``full``); ``no-chunking`` is not compared here (the group CLI
does not take a policy).  The lab's processes (master, workers, the routers' proxies, the client)
share this machine's cores: a stage's compute is not a GPU's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .joinbench import HEALTH, _drain, _line, _molink, _stop
from .lab import Hosts, Lab
from .tunlink import DelayLine

# Who serves, per hop mode: "relayed", d and b with --no-direct (every hop through the master);
# "direct", d and a (the master's own host, as a user who shares their GPU and runs the master:
# both homes' routers map ports, so whichever stage comes first can dial the other; b's router
# maps nothing, so a hop into b would be relayed whatever the workers ask)
FRIENDS = {"relayed": ("d", "b"), "direct": ("d", "a")}
# "direct": each offers 0.5 GB, less than the default model (0.54 GB of weights) and its cache, so the
# planner splits it over both (with all it has free, a's worker took every layer and d stood by)
WORKER_FLAGS = {"relayed": ("--no-direct",), "direct": ("--memory-limit", "0.5")}
# With --line, two homes: a (the master and one stage) and b (the other stage); each stage offers
# 0.5 GB so that the model is split between the homes, and every step crosses the line twice
LINE_FRIENDS = ("a", "b")
LINE_FLAGS = {"relayed": ("--no-direct", "--memory-limit", "0.5"), "direct": ("--memory-limit", "0.5")}

# The client, run on host a: streams and long prompts through the API; prints one JSON line.
CLIENT = r"""
import json, random, sys, threading, time, urllib.request
api, streams, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
spacing, calm, token = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
with urllib.request.urlopen(api + '/v1/models', timeout=10) as r:
    model = json.loads(r.read())['data'][0]['id']
times = [[] for _ in range(streams)]
answers = [None] * len(prompts)
sent = [None] * len(prompts)
stop = threading.Event()
def post(body, timeout):
    req = urllib.request.Request(api + '/v1/completions', data=json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json'})
    return urllib.request.urlopen(req, timeout=timeout)
errors = []
def stream(i):
    body = {'model': model, 'prompt': [1000 + 37 * i + k for k in range(12)], 'max_tokens': 1000,
            'temperature': 0, 'ignore_eos': True, 'stream': True}
    try:
        with post(body, 900) as r:
            for line in r:
                if stop.is_set():
                    return
                if line.startswith(b'data: {'):
                    times[i].append(time.monotonic())
    except Exception as e:  # said in the report: a stream that failed has no gaps to judge
        errors.append(f'stream {i}: {e!r} {getattr(e, "read", lambda: b"")()[:300]!r}')
def long(j, n):
    rng = random.Random(j)
    body = {'model': model, 'prompt': [rng.randrange(1000, 30000) for _ in range(n)], 'max_tokens': 1, 'temperature': 0}
    sent[j] = time.monotonic()
    with post(body, 900) as r:
        json.loads(r.read())
    answers[j] = time.monotonic()
runners = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
for t in runners:
    t.start()
time.sleep(calm)
longs = []
for j, n in enumerate(prompts):
    longs.append(threading.Thread(target=long, args=(j, n), daemon=True))
    longs[-1].start()
    time.sleep(spacing)
for t in longs:
    t.join(900)
time.sleep(2.0)
stop.set()
req = urllib.request.Request(api + '/dashboard/api/steps', headers={'X-MoLink-Token': token})
with urllib.request.urlopen(req, timeout=60) as r:  # the master's step timelines (same monotonic clock)
    got = json.loads(r.read())
print(json.dumps({'times': times, 'sent': sent, 'answers': answers, 'errors': errors, 'steps': got['steps'],
                  'costs': got['costs']}))
"""


def gaps_report(times: list[list[float]], sent: list[float], answers: list[float | None]) -> dict:
    """The burst's figures from the streams' token arrival ``times``, the long prompts' ``sent``
    times and their ``answers`` (None: never answered): the calm gap median (gaps ending before
    the first long prompt was sent), the gaps' p50 and p99 during the burst (gaps ending between
    the first long prompt's sending and the last answer; every later gap when one was never
    answered), p99 over the calm median, and each long prompt's seconds to its answer."""
    import statistics

    start, end = _burst(sent, answers)
    calm, burst = [], []
    for ts in times:
        for a, b in zip(ts, ts[1:]):
            (calm if b < start else burst if b <= end else []).append(b - a)
    calm_p50 = statistics.median(calm) if calm else None
    p99 = _percentile(burst, 99)
    return {
        "calm_gaps": len(calm),
        "calm_p50_s": calm_p50,
        "burst_gaps": len(burst),
        "burst_p50_s": _percentile(burst, 50),
        "burst_p99_s": p99,
        "burst_p99_over_calm_p50": p99 / calm_p50 if p99 is not None and calm_p50 else None,
        "long_prompt_seconds": [None if a is None else a - s for s, a in zip(sent, answers)],
        "burst_seconds": end - start,
    }


def links_share(steps: list[dict], sent: list[float], answers: list[float | None]) -> dict:
    """Where the burst's decode steps spent their time outside the stages: for each step that began
    during the burst (as :func:`gaps_report` bounds it), carried decode steps and has every stage's
    hold (``held``: arrival to hand-on), its wall time minus those holds (the links, and the
    master); the p50 / p90 / p99 of that and how many steps it covers."""
    start, end = _burst(sent, answers)
    rest = [s["ended"] - s["began"] - sum(s["held"]) for s in steps
            if start <= s["began"] <= end and s["decodes"] and s["held"]]  # fmt: skip
    return {"steps": len(rest), **{f"p{q}_s": _percentile(rest, q) for q in (50, 90, 99)}}


def _burst(sent: list[float], answers: list[float | None]) -> tuple[float, float]:
    """When the burst began (the first long prompt sent) and ended (the last answer; never, when one
    was never answered)."""
    done = [a for a in answers if a is not None]
    return min(sent), max(done) if len(done) == len(answers) else float("inf")


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest rank, as the bench's ``master_core.workload.percentile`` (the lab imports nothing of
    master_core: tests/import_layout.py)."""
    import math

    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def measure(lab: Hosts, model: str, mode: str, work: Path, args: argparse.Namespace) -> dict:
    """One fresh group in ``mode`` (relayed: the workers dial no hops) and one burst on it."""
    friends, flags = (LINE_FRIENDS, LINE_FLAGS[mode]) if args.line else (FRIENDS[mode], WORKER_FLAGS[mode])
    procs = []
    log = work / "master.log"
    try:
        master = _molink(lab, "a", "group", "create", "--model", model, "--port", "7733", "--api-port", "8000",
                         "--data-dir", str(work / "master"), "--name", "burst", "--min-workers", "2")  # fmt: skip
        procs.append(master)
        link, before = "", []
        for friend in friends:
            if not link:
                link = _line(master, "Join link:", 300, seen=before).split()[-1]
                _drain(master, keep=log)
            lab.run(friend, [sys.executable, "-m", "app.cli", "join", link, "--data-dir", str(work / friend)],
                    timeout=120)  # fmt: skip
            worker = _molink(lab, friend, "worker", "--data-dir", str(work / friend), "--device", "cpu",
                             *flags)  # fmt: skip
            procs.append(worker)
            _drain(worker)
            if friend == friends[0]:  # a pairing code is single use: a new one for the next friend
                code = lab.run("a", [sys.executable, "-m", "app.cli", "group", "code", "--data-dir",
                                     str(work / "master")], timeout=60).stdout  # fmt: skip
                link = next(x.split()[-1] for x in code.splitlines() if x.startswith("Join link:"))
        lab.run("a", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "900"], timeout=920)
        prompts = json.dumps(list(args.prompts))
        lines = before + log.read_text(errors="replace").splitlines()
        token = next(x.split("token=")[-1].split()[0] for x in lines if "/dashboard?token=" in x)
        out = lab.run("a", [sys.executable, "-c", CLIENT, "http://127.0.0.1:8000", str(args.streams), prompts,
                            str(args.spacing), str(args.calm), token], timeout=1800)  # fmt: skip
        got = json.loads(out.stdout.strip().splitlines()[-1])
        served = [x for x in log.read_text(errors="replace").splitlines() if "serving epoch" in x]
        figures = gaps_report(got["times"], got["sent"], got["answers"])
        pipeline = served[-1].split(": ", 1)[-1] if served else None
        if args.steps:  # the master's step timelines and the client's times, for looking into a run
            keep = {k: got[k] for k in ("times", "sent", "answers", "steps", "costs")}
            Path(f"{args.steps}.{mode}.json").write_text(json.dumps(keep))
        links = links_share(got["steps"], got["sent"], got["answers"])
        return {"hops": mode, "pipeline": pipeline, "stream_errors": got["errors"], **figures, "burst_links": links}
    finally:
        _stop(procs)


def main(argv: list[str] | None = None) -> int:
    import signal

    p = argparse.ArgumentParser(description="a burst of long prompts over streams, stages in other homes (lab)")
    p.add_argument("--model", default="default")
    p.add_argument("--mbps", type=float, default=20.0)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one way, added to TCP leaving each home")
    p.add_argument("--congestion", default="cubic", help="every host's TCP congestion control (default %(default)s)")
    p.add_argument("--line", action="store_true",
                   help="two homes joined by a delay line TCP sees end to end (--delay-ms one way, --mbps each "
                        "way) instead of the lab's routers: the master and one stage on a, the other on b")  # fmt: skip
    p.add_argument("--hops", default="relayed,direct", help="relayed, direct (comma separated)")
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--prompts", default="1300,1300,1300", help="the long prompts' lengths in tokens")
    p.add_argument("--spacing", type=float, default=1.5, help="seconds between the long prompts")
    p.add_argument("--calm", type=float, default=10.0, help="seconds of streams before the first long prompt")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", default=None, metavar="PREFIX",
                   help="write each mode's step timelines and token times to PREFIX.MODE.json")  # fmt: skip
    args = p.parse_args(argv)
    args.prompts = tuple(int(x) for x in args.prompts.split(",") if x)
    modes = [m for m in args.hops.split(",") if m]
    if not modes or any(m not in FRIENDS for m in modes) or not args.prompts:
        p.error(f"--hops takes {', '.join(FRIENDS)}; --prompts at least one length")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still take the lab down
    results: dict = {"mbps": args.mbps, "delay_ms_one_way": args.delay_ms, "congestion": args.congestion}
    results |= {"model": args.model, "topology": "line" if args.line else "hops"}
    results |= {"streams": args.streams, "prompts": list(args.prompts), "spacing_s": args.spacing, "runs": []}
    homes = (DelayLine("bline", args.delay_ms / 1000, args.mbps, args.congestion) if args.line else
             Lab.up("blab", "hops", mbps=args.mbps, delay_ms=args.delay_ms, congestion=args.congestion))  # fmt: skip
    with homes as lab:
        for mode in modes:
            with tempfile.TemporaryDirectory() as work:
                results["runs"].append(measure(lab, args.model, mode, Path(work), args))
            print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
