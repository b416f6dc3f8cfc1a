"""The `molink` command line: a thin frontend over master_core and worker_core.

Contract: ``main(argv)`` parses arguments into the process's typed config and runs one
subcommand; it returns the exit code.  A bad argument or an unusable setting prints one
line to stderr and exits 2 (no traceback); Ctrl-C or SIGTERM stops cleanly with 0.  This
module is the parser and its dispatch (``set_defaults(func=...)``); each subcommand is one
:data:`~app.cli.command.Command` in :mod:`app.cli.group` (master, group, join, api-key),
:mod:`app.cli.worker` (worker, probe, relay) or :mod:`app.cli.tools` (bench, eval, loadtest, chaos,
demo, selftest),
taking the parsed arguments and, for supervised processes, the control channel, and
returning its exit code or the coroutine function (:data:`~app.cli.command.Run`) that :func:`main` runs until
it ends, Ctrl-C or SIGTERM; engine modules are imported only inside the subcommand that
needs them.  Defaults are not written here: they come from their owners
(:class:`~master_core.config.MasterConfig`, :class:`~worker_core.config.WorkerConfig`,
:class:`~app.tools.demo.DemoOptions`, :class:`~app.tools.bench.options.BenchOptions`; light
modules: ``molink`` starts without the simulator, aiohttp or the chaos harness).

``--supervised`` (``worker``, ``master``, ``group create``, ``relay``): the process is run by the MoLink
app: commands on stdin, ``@molink`` events on stdout, and nothing else on stdout (prints go
to stderr); the protocol is :mod:`worker_core.control`.  ``app`` starts the tray app
(:mod:`app.desktop.main`, imported only then).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING

from app.tools.bench.options import BenchOptions
from app.tools.chaos.options import ChaosOptions
from app.tools.demo import DemoOptions
from app.tools.evaluate import EvalOptions
from master_core.config import MasterConfig
from worker_core.config import WorkerConfig

from . import group as cli_group
from . import tools as cli_tools
from . import worker as cli_worker
from .command import Command, Run, Supervision

if TYPE_CHECKING:
    from worker_core.control import Events

SUPERVISED_HELP = "controlled by the MoLink app: commands on stdin, events on stdout; exits when stdin closes"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="molink", description="Pool consumer GPUs to serve one large language model.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("master", help="run the master: scheduler, relay and OpenAI-compatible API")
    m.add_argument(
        "--model", default=MasterConfig.model, help="checkpoint folder, hub id, or 'default' (SmolLM2-135M-Instruct)"
    )
    m.add_argument("--host", default=MasterConfig.host, help="address to bind (default %(default)s)")
    m.add_argument("--port", type=int, default=MasterConfig.port, help="API and worker tunnels (default %(default)s)")
    m.add_argument(
        "--api-key",
        default=None,
        help="API key; binding a non-loopback address needs one (else the stored key is used)",
    )
    m.add_argument("--allow-host", action="append", default=[], help="extra Host name the API and dashboard answer to")
    m.add_argument("--supervised", action="store_true", help=SUPERVISED_HELP)
    m.set_defaults(func=cli_group.master)

    k = sub.add_parser("api-key", help="print the stored API key, or make a new one with --new")
    k.add_argument("--new", action="store_true", help="create and store a new key")
    k.set_defaults(func=cli_group.api_key)

    g = sub.add_parser("group", help="a paired group: create it, hand out pairing codes, list or remove members")
    gsub = g.add_subparsers(dest="group_command", required=True)
    gc = gsub.add_parser("create", help="make a group on this machine, run its master, print a pairing code")
    gc.add_argument("--model", default=MasterConfig.model, help="checkpoint folder, .gguf file, hub id, or 'default'")
    gc.add_argument(
        "--host", default=MasterConfig.group_host, help="address of the group port (default %(default)s: all)"
    )
    gc.add_argument(
        "--port",
        type=int,
        default=MasterConfig.group_port,
        help="group port: pairing and worker tunnels (default %(default)s)",
    )
    gc.add_argument(
        "--api-port",
        type=int,
        default=MasterConfig.port,
        help="OpenAI-compatible API on 127.0.0.1 (default %(default)s)",
    )
    gc.add_argument("--name", default=MasterConfig.group_name, help="group name shown to joiners (default: host name)")
    gc.add_argument(
        "--no-port-mapping",
        dest="port_mapping",
        action="store_false",
        help="do not ask the home router to map the group port (UPnP, NAT-PMP, PCP)",
    )
    gc.add_argument("--supervised", action="store_true", help=SUPERVISED_HELP)
    gc.add_argument("--data-dir", default=None, help="folder for the group's state (default: the user data folder)")
    gc.set_defaults(func=cli_group.group_create)
    for parser in (m, gc):  # what both kinds of master take
        parser.add_argument(
            "--min-workers",
            type=int,
            default=MasterConfig.min_workers,
            help="serve only while at least this many workers are members (default %(default)s)",
        )
        parser.add_argument(
            "--quantize",
            choices=("none", "int8", "int4"),
            default=MasterConfig.quantize,
            help="how every worker stores its decoder layers: none (the compute dtype), int8 or int4 "
            "(bitsandbytes; embeddings and LM head stay in the compute dtype; default %(default)s)",
        )
        parser.add_argument(
            "--relay",
            default=MasterConfig.relay,
            metavar="HOST:PORT",
            help="register the group at this relay (molink relay), so machines that cannot reach the group port "
            "join and serve through it; paired groups only",
        )
        parser.add_argument(
            "--speculative",
            action="store_true",
            default=MasterConfig.speculative,
            help="draft tokens from each request's own text (prompt lookup) and verify several per trip through "
            "the pipeline: faster on slow links for answers that repeat their prompt (copy, edit, summarize); "
            "greedy and seeded output unchanged",
        )
        parser.add_argument(
            "--draft-model",
            default=MasterConfig.draft_model,
            metavar="PATH",
            help="with speculation (implied): a local folder of a small model sharing the served model's "
            "tokenizer (the same family) drafts where prompt lookup finds nothing: on the last stage where the "
            "pipeline loops back (it gets the model from this machine), else on this machine",
        )
        parser.add_argument(
            "--capacity-wait",
            type=float,
            default=MasterConfig.capacity_wait,
            help="seconds requests wait for a group that cannot serve (a needed member left) before they end "
            "with 503 and Retry-After (default %(default)s)",
        )
    for verb, text, func in (
        ("code", "print a fresh pairing code", cli_group.group_code),
        ("members", "list the group's members", cli_group.group_members),
    ):
        v = gsub.add_parser(verb, help=text)
        v.add_argument("--data-dir", default=None, help="the group's folder (default: the user data folder)")
        v.set_defaults(func=func, quiet=True)
    gr = gsub.add_parser("remove", help="revoke a member at once")
    gr.add_argument("member", help="member name, as `molink group members` shows it")
    gr.add_argument("--data-dir", default=None, help="the group's folder")
    gr.set_defaults(func=cli_group.group_remove, quiet=True)

    j = sub.add_parser("join", help="pair this machine with a group using the code its owner read to you")
    j.add_argument("code", help="the pairing code, e.g. 47-8203-1956, or the molink://join link")
    j.add_argument("--master", default=None, help="HOST:PORT of the group port (default: found on the LAN by mDNS)")
    j.add_argument(
        "--data-dir",
        default=None,
        help="folder for this machine's identity and membership (default: the user data folder)",
    )
    j.add_argument(
        "--relay",
        default=None,
        metavar="HOST:PORT",
        help="find the group through this relay by the code alone (when its master is not on this network)",
    )
    j.add_argument("--name", default=None, help="name to show the group (default: host name)")
    j.set_defaults(func=cli_group.join, quiet=True)

    w = sub.add_parser("worker", help="serve the layers the master assigns, over a tunnel dialled out to it")
    w.add_argument(
        "--master", default=None, help="HOST:PORT of an unpaired loopback master (plain, unauthenticated: tests only)"
    )
    w.add_argument("--data-dir", default=None, help="the joined group's folder (default: the user data folder)")
    w.add_argument("--device", default=WorkerConfig.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    w.add_argument("--name", default=None, help="name shown to the group (default: host name)")
    w.add_argument(
        "--link-delay-ms",
        type=float,
        default=WorkerConfig.link_delay_ms,
        help="emulate this one-way link delay per direction (measurement)",
    )
    w.add_argument(
        "--link-mbps",
        type=float,
        default=WorkerConfig.link_mbps,
        help="emulate this link bandwidth per direction, Mbit/s (measurement)",
    )
    w.add_argument("--threads", type=int, default=WorkerConfig.threads, help="torch CPU threads for this worker")
    w.add_argument("--memory-limit", type=float, default=None, help="GB of memory to offer (default: all that is free)")
    w.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="no direct hops: every activation to and from this worker goes through the master",
    )
    w.add_argument(
        "--dial-only",
        dest="hop_listen",
        action="store_false",
        help="direct hops: dial the next stage but open no listener (no inbound port; the hop into this worker "
        "is relayed)",
    )
    w.add_argument(
        "--hop-port",
        type=int,
        default=WorkerConfig.hop_port,
        help="port of the hop listener (default: 7734 in a paired group when free, else any)",
    )
    w.add_argument(
        "--hop-host",
        default=WorkerConfig.hop_host,
        help="host or address the other stages should dial for direct hops (default: what the master sees)",
    )
    w.add_argument(
        "--no-port-mapping",
        dest="port_mapping",
        action="store_false",
        help="do not ask the home router to map the hop port (UPnP, NAT-PMP, PCP)",
    )
    w.add_argument(
        "--relay",
        default=None,
        metavar="HOST:PORT",
        help="reach the master through this relay when its group port does not answer (default: the relay the "
        "group named when this machine joined)",
    )
    w.add_argument(
        "--via-relay", action="store_true", help="always reach the master through the relay (measurement, tests)"
    )
    w.add_argument("--supervised", action="store_true", help=SUPERVISED_HELP)
    w.set_defaults(func=cli_worker.worker)

    r = sub.add_parser(
        "relay", help="run a relay: splices members' connections to masters that registered here (no model, no torch)"
    )
    r.add_argument(
        "--listen", default="0.0.0.0:7735", metavar="HOST:PORT", help="address to listen on (default %(default)s)"
    )
    r.add_argument("--max-connections", type=int, default=None, help="open connections at most (default 1024)")
    r.add_argument("--session-mbps", type=float, default=None, help="Mbit/s per direction of one session (default 100)")
    r.add_argument("--total-mbps", type=float, default=None, help="Mbit/s over all sessions (default 1000)")
    r.add_argument(
        "--map-port",
        action="store_true",
        help="ask the home router to map the relay's port (UPnP, NAT-PMP, PCP): a member's PC behind a router",
    )
    r.add_argument("--supervised", action="store_true", help=SUPERVISED_HELP)
    r.set_defaults(func=cli_worker.relay)

    a = sub.add_parser("app", help="the MoLink desktop app: a tray icon that shares this PC's GPU and hosts groups")
    a.add_argument("--selftest", action="store_true", help="start, check the app's parts and exit (0: all good)")
    a.add_argument(
        "--background", action="store_true", help="start in the tray without opening a window (used at login)"
    )
    a.add_argument("link", nargs="?", default=None, help="a molink://join?... link to open")
    a.set_defaults(func=_app)

    d = sub.add_parser("demo", help="master + 3 local workers on the default model; ask one question")
    d.add_argument("--serve", action="store_true", help="keep the API up until interrupted")
    d.add_argument("--port", type=int, default=DemoOptions.port, help="API port with --serve (default %(default)s)")
    d.add_argument(
        "--workers", type=int, default=DemoOptions.workers, help="local worker processes (default %(default)s)"
    )
    d.add_argument("--model", default=DemoOptions.model, help=argparse.SUPPRESS)
    d.add_argument("--question", default=DemoOptions.question, help="the chat question")
    d.add_argument(
        "--max-tokens", type=int, default=DemoOptions.max_tokens, help="answer length limit (default %(default)s)"
    )
    d.set_defaults(func=cli_tools.demo, quiet=True)

    st = sub.add_parser(
        "selftest", help="split the default model over 2 local workers, check 8 greedy tokens against one process"
    )
    st.add_argument("--device", default=WorkerConfig.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    st.set_defaults(func=cli_tools.selftest)

    pr = sub.add_parser(
        "probe", help="show what this machine can offer: GPUs, memory, CPU, measured speed, link to a master"
    )
    pr.add_argument("--device", default=WorkerConfig.device, help="auto | cpu | cuda | cuda:N")
    pr.add_argument("--master", default=None, help="HOST:PORT of a plain loopback master to time the round trip to")
    pr.add_argument(
        "--data-dir",
        default=None,
        help="a joined machine's folder: measure the link to its group's master (RTT, bandwidth)",
    )
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=cli_worker.probe)

    b = sub.add_parser(
        "bench", help="compare scheduling policies on emulated links (or --simulate a 70B model on GPUs)"
    )
    b.add_argument(
        "--simulate", action="store_true", help="use the simulator with a modelled 70B-class model on 4 and 8 GPUs"
    )
    b.add_argument(
        "--profiles",
        default=",".join(BenchOptions.profiles),
        help="link profiles: lan (1 Gbit/s, 0.5 ms), wan (100 Mbit/s, 20 ms), slow (20 Mbit/s, 40 ms), "
        "home (20 Mbit/s, 80 ms)",
    )
    b.add_argument(
        "--policies", default=",".join(BenchOptions.policies), help="scheduling policies to compare (default: all)"
    )
    b.add_argument("--requests", type=int, default=None, help="requests per run (default: BenchOptions's)")
    b.add_argument(
        "--rate", type=float, default=None, help="Poisson arrival rate, requests/s (default: BenchOptions's)"
    )
    b.add_argument(
        "--single", action="store_true", help="one request at a time: 3 stages vs single-process transformers"
    )
    b.add_argument(
        "--burst", action="store_true", help="bursts of long prompts over short streams: gap p99/median per policy"
    )
    b.add_argument("--burst-prompts", default="", help="--burst: the long prompts' lengths, e.g. 1300,1300,1300")
    b.add_argument("--burst-spacing", type=float, default=0.0, help="--burst: seconds between their arrivals")
    b.add_argument("--burst-streams", type=int, default=0, help="--burst: short greedy streams decoding meanwhile")
    b.add_argument(
        "--concurrent", type=int, default=0, help="N concurrent clients vs one process serving them as one batch"
    )
    b.add_argument(
        "--hops", action="store_true", help="one stream at a time: direct stage-to-stage hops vs every hop relayed"
    )
    b.add_argument(
        "--chat",
        action="store_true",
        help="a 5-turn conversation (a pasted document): TTFT with and without prefix caching",
    )
    b.add_argument(
        "--speculative",
        action="store_true",
        help="copy, edit, summarize and open chat: decode tokens/s with and without prompt-lookup speculation",
    )
    b.add_argument(
        "--draft-model",
        default=BenchOptions.draft_model,
        metavar="PATH|self|first:N",
        help="with --speculative, also draft with this model where prompt lookup finds nothing: a folder, "
        "self (the served model drafts for itself: an upper bound) or first:N (its first N layers)",
    )
    b.add_argument(
        "--no-loop-back",
        action="store_true",
        help="the master sends every step (the last stage feeds no tokens back); to compare runs",
    )
    b.add_argument("--seed", type=int, default=BenchOptions.seed)
    b.add_argument(
        "--repeats",
        type=int,
        default=BenchOptions.repeats,
        help="real runs: each profile's workload again with the next seeds; reports the simulator's median error",
    )
    b.add_argument("--out", default=str(BenchOptions().out), help="folder for bench.json and the plots")
    b.set_defaults(func=cli_tools.bench, quiet=True)

    ev = sub.add_parser(
        "eval", help="quality per precision through 3 local stages: perplexity, greedy agreement, memory, speed"
    )
    ev.add_argument("--model", default=EvalOptions.model, help="checkpoint folder, hub id, or 'default'")
    ev.add_argument(
        "--precisions", default=",".join(EvalOptions.precisions), help="comma list of none,int8,int4 (default all)"
    )
    ev.add_argument("--workers", type=int, default=EvalOptions.workers, help="local stages (default %(default)s)")
    ev.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens and 2,048 text tokens")
    ev.add_argument("--out", default=str(EvalOptions().out), help="JSON file of the results (default %(default)s)")
    ev.set_defaults(func=cli_tools.evaluate, quiet=True)

    ch = sub.add_parser("chaos", help="fault tolerance, measured: a local group under worker kills, freezes, link cuts")
    ch.add_argument("--model", default=ChaosOptions.model, help="checkpoint folder, hub id, or 'default'")
    ch.add_argument("--workers", type=int, default=ChaosOptions.workers, help="worker processes (default %(default)s)")
    ch.add_argument("--min-workers", type=int, default=None, help="the master serves with this many (workers-1)")
    ch.add_argument("--requests", type=int, default=ChaosOptions.requests, help="per run (default %(default)s)")
    ch.add_argument("--concurrency", type=int, default=ChaosOptions.concurrency, help="streams at once")
    ch.add_argument("--faults", default=",".join(k.value for k in ChaosOptions.faults), help="kill,freeze,cut")
    ch.add_argument("--fault-count", type=int, default=ChaosOptions.fault_count, help="faults at most")
    ch.add_argument("--fault-gap", type=float, default=ChaosOptions.fault_gap, help="seconds between faults")
    ch.add_argument("--freeze-seconds", type=float, default=ChaosOptions.freeze_seconds)
    ch.add_argument("--cut-seconds", type=float, default=ChaosOptions.cut_seconds, help="link down after a cut")
    ch.add_argument("--cut-mode", choices=("rst", "close"), default=ChaosOptions.cut_mode.value)
    ch.add_argument("--prompt-words", default="{},{}".format(*ChaosOptions.prompt_words), help="LOW,HIGH prompt words")
    ch.add_argument("--max-tokens", default="{},{}".format(*ChaosOptions.max_tokens), help="LOW,HIGH max_tokens")
    ch.add_argument("--link-delay-ms", type=float, default=ChaosOptions.link_delay_ms, help="one-way, every worker")
    ch.add_argument("--threads", type=int, default=ChaosOptions.threads, help="torch threads per worker")
    ch.add_argument("--memory-limit", type=float, default=None, help="GB each worker offers")
    ch.add_argument("--seed", type=int, default=ChaosOptions.seed)
    ch.add_argument(
        "--stage", type=int, default=None, help="fault the worker serving this stage (0: the first), not a random one"
    )
    ch.add_argument("--out", default=str(ChaosOptions.out), help="JSON report (default %(default)s)")
    ch.add_argument("--log-dir", default=None, help="keep the children's logs here (default: a temporary folder)")
    ch.add_argument("--check", action="store_true", help="exit 1 unless every stream matches the fault-free run")
    ch.set_defaults(func=cli_tools.chaos, quiet=True)

    lt = sub.add_parser(
        "loadtest", help="the master alone under many concurrent streams (fake stages), or placement timing"
    )
    lt.add_argument("--streams", type=int, default=1000, help="concurrent streams (default %(default)s)")
    lt.add_argument("--tokens", type=int, default=32, help="tokens per stream (default %(default)s)")
    lt.add_argument("--stages", type=int, default=1, help="fake stages in the pipeline (default %(default)s)")
    lt.add_argument("--model", default="default", help="the master's model: tokenizer and dimensions only")
    lt.add_argument("--placement", action="store_true", help="time placement of 8, 16, 32 and 64 members instead")
    lt.add_argument("--out", default=None, help="also write the results to this JSON file")
    lt.set_defaults(func=cli_tools.loadtest, quiet=True)

    from app.tools.netlab.command import add_parser as add_lab  # the network lab (molink lab up/run/down)

    add_lab(sub)
    return p


def _run(coro_fn: Run, events: Events | None = None) -> int:
    """Run a coroutine until it ends, Ctrl-C, or SIGTERM; return its exit code.  A failure
    the user should see is also an ``error`` event when supervised."""

    async def wrapper() -> int:
        task = asyncio.ensure_future(coro_fn())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: KeyboardInterrupt instead
                loop.add_signal_handler(sig, task.cancel)
        try:
            return int(await task or 0)
        except asyncio.CancelledError:
            return 0
        except OSError as e:  # a port in use, an unreachable address: one line, no traceback
            line = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
            print(f"molink: {line}", file=sys.stderr)
            if events is not None:
                events.emit("error", message=line)
            return 2

    try:
        return asyncio.run(wrapper())
    except KeyboardInterrupt:
        return 0


def _supervise(args: argparse.Namespace) -> Supervision:
    """Supervised: the control channel on stdin, events on the real stdout, and every other
    write to stdout sent to stderr (stdout then carries events only)."""
    if not getattr(args, "supervised", False):
        return Supervision()
    from worker_core.control import Control, Events

    events = Events(sys.stdout)
    sys.stdout = sys.stderr
    return Supervision(Control(), events)


def _app(args: argparse.Namespace, sup: Supervision) -> int:
    from app.desktop.main import main as app_main  # the tray app: Qt, no engine in this process

    return app_main(args)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Command = args.func
    if func is _app:  # Qt: no engine logging, no control channel
        return _app(args, Supervision())
    sup = _supervise(args)
    logging.basicConfig(
        # the demo, benchmark, join and admin verbs print their own story: their log is warnings unless -v
        level=logging.DEBUG if args.verbose else logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",  # steps take milliseconds
        datefmt="%H:%M:%S",
    )
    try:
        outcome = func(args, sup)
        return outcome if isinstance(outcome, int) else _run(outcome, sup.events)
    except ValueError as e:  # config and device errors carry one clear line
        print(f"molink: {e}", file=sys.stderr)
        if sup.events is not None:
            from worker_core.control import one_line

            sup.events.emit("error", message=one_line(str(e)))
        return 2
