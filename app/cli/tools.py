"""The measuring and trying-out verbs of `molink`: ``bench``, ``eval``, ``loadtest``, ``chaos``, ``demo``, ``selftest``.

Contract: each command takes the parsed arguments (:func:`app.cli._parser`) and the control
channel (:class:`app.cli.command.Supervision`, unused: none of these runs supervised) and returns
its exit code, or the coroutine function that :func:`app.cli.main` runs until it ends,
Ctrl-C or SIGTERM.  A command only turns its arguments into the options of the module that
does the work (:class:`~app.tools.bench.options.BenchOptions`, :class:`~app.tools.evaluate.EvalOptions`,
:class:`~app.tools.loadtest.LoadOptions`, :class:`~app.tools.chaos.options.ChaosOptions`,
:class:`~app.tools.demo.DemoOptions`, :class:`~app.tools.selftest.SelftestOptions`), imported inside the
command; an unknown profile, policy or precision raises ``ValueError`` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from app.tools.bench.options import PROFILES, SIMULATED_RATE, SIMULATED_REQUESTS, BenchOptions
from app.tools.demo import DemoOptions
from app.tools.evaluate import EvalOptions

if TYPE_CHECKING:
    from .command import Run, Supervision


def bench(args: argparse.Namespace, sup: Supervision) -> Run:
    from app.tools.bench.run import run_bench
    from master_core.scheduler import POLICIES

    profiles = tuple(x for x in args.profiles.split(",") if x)
    policies = tuple(x for x in args.policies.split(",") if x)
    bad = [x for x in profiles if x not in PROFILES] + [x for x in policies if x not in POLICIES]
    if bad:
        raise ValueError(f"unknown profile or policy: {', '.join(bad)}")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    bopts = BenchOptions(
        profiles=profiles,
        policies=policies,
        requests=args.requests or (SIMULATED_REQUESTS if args.simulate else BenchOptions.requests),
        rate=args.rate or (SIMULATED_RATE if args.simulate else BenchOptions.rate),
        seed=args.seed,
        repeats=args.repeats,
        simulate=args.simulate,
        single=args.single,
        burst=args.burst,
        concurrent=args.concurrent,
        hops=args.hops,
        chat=args.chat,
        speculative=args.speculative,
        draft_model=args.draft_model,
        loop_back=not args.no_loop_back,
        out=Path(args.out),
        burst_prompts=tuple(int(x) for x in args.burst_prompts.split(",") if x),
        burst_spacing=args.burst_spacing,
        burst_streams=args.burst_streams,
    )
    return lambda: run_bench(bopts)


def evaluate(args: argparse.Namespace, sup: Supervision) -> Run:
    from app.tools.evaluate import run_eval
    from worker_core.wire import QUANTIZE_CHOICES

    precisions = tuple(x for x in args.precisions.split(",") if x)
    bad = [x for x in precisions if x not in QUANTIZE_CHOICES]
    if bad or not precisions:
        raise ValueError(f"unknown precision {', '.join(bad) or '(none given)'}; use {', '.join(QUANTIZE_CHOICES)}")
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    opts = EvalOptions(
        model=args.model, precisions=precisions, workers=args.workers, quick=args.quick, out=Path(args.out)
    )
    return lambda: run_eval(opts)


def loadtest(args: argparse.Namespace, sup: Supervision) -> Run:
    import json

    from app.tools.loadtest import LoadOptions, placement_times, print_report, run_load

    async def main() -> int:
        if args.placement:
            result: dict = {"placement": await asyncio.to_thread(placement_times)}
        else:
            opts = LoadOptions(model=args.model, streams=args.streams, tokens=args.tokens, stages=args.stages)
            result = {"load": await run_load(opts)}
        print_report(result)
        if args.out:
            await asyncio.to_thread(Path(args.out).write_text, json.dumps(result, indent=2))
        return 0

    return main


def chaos(args: argparse.Namespace, sup: Supervision) -> Run:
    from app.tools.chaos.options import options_from_args
    from app.tools.chaos.run import run_chaos

    opts = options_from_args(args)
    return lambda: run_chaos(opts)


def demo(args: argparse.Namespace, sup: Supervision) -> Run:
    from app.tools.demo import run_demo

    opts = DemoOptions(
        serve=args.serve,
        port=args.port,
        workers=args.workers,
        model=args.model,
        question=args.question,
        max_tokens=args.max_tokens,
    )
    return lambda: run_demo(opts)


def selftest(args: argparse.Namespace, sup: Supervision) -> int:
    from app.tools.selftest import SelftestOptions, run_selftest

    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # it prints its own story
    return run_selftest(SelftestOptions(device=args.device))
