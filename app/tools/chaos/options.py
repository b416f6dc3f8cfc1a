"""The options of `molink chaos` and the kinds of fault: light, so the parser reads its defaults
without aiohttp or the chaos harness.

Contract: :class:`ChaosOptions` is one chaos run's configuration (``validate()`` raises
``ValueError`` with one line for the user); :func:`options_from_args` turns the ``molink chaos``
arguments into it; :class:`FaultKind` names the faults (:mod:`app.tools.chaos.group` injects them).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from app.tools.netlab.tcp_proxy import CutMode


class FaultKind(Enum):
    KILL = "kill"  # kill -9, then start the worker again at once
    FREEZE = "freeze"  # SIGSTOP for freeze_seconds, then SIGCONT
    CUT = "cut"  # reset the tunnel at the proxy; refuse new connections for cut_seconds


@dataclass(frozen=True)
class ChaosOptions:
    model: str = "default"  # checkpoint folder, hub id, or "default"
    workers: int = 4  # worker processes
    min_workers: int | None = None  # the master serves with this many (None: workers - 1, so one may be lost)
    requests: int = 200  # requests in the workload (run twice)
    concurrency: int = 8  # streams open at once
    seed: int = 0
    stage: int | None = None  # fault the worker serving this stage (0: the first) at each fault; None: any worker
    faults: tuple[FaultKind, ...] = (FaultKind.KILL, FaultKind.FREEZE, FaultKind.CUT)
    fault_count: int = 6  # faults at most (kinds in a seeded random order, equally often)
    fault_gap: float = 3.0  # seconds the group serves after a rejoin before the next fault
    freeze_seconds: float = 10.0
    cut_seconds: float = 2.0  # new connections refused this long after a cut
    cut_mode: CutMode = CutMode.RST
    prompt_words: tuple[int, int] = (4, 160)  # prompt length range in words (log-uniform)
    max_tokens: tuple[int, int] = (8, 64)  # max_tokens range (log-uniform)
    seeded_share: float = 0.5  # share of requests sampled (temperature 0.8, top_p 0.95, seeded); the rest greedy
    link_delay_ms: float = 0.0  # emulated one-way delay on every worker's tunnel
    threads: int = 1  # torch threads per worker
    memory_limit_gb: float | None = None  # memory each worker offers (None: all free)
    startup_timeout: float = 600.0  # seconds for the group to form
    settle_timeout: float = 180.0  # seconds the group may take to serve with every worker again after a fault
    request_timeout: float = 300.0  # seconds one stream may take; beyond, it counts as hung (failed)
    out: Path = Path("chaos.json")
    log_dir: Path | None = None  # children's stderr (None: a temporary folder, removed)
    check: bool = False  # exit 1 unless every request completed identical to the fault-free run, no cache left

    def validate(self) -> None:
        if self.workers < 2:
            raise ValueError("--workers must be at least 2 (one to lose, one to serve)")
        if not 1 <= self.min_serving <= self.workers:
            raise ValueError("--min-workers must be between 1 and --workers")
        if self.requests < 1 or self.concurrency < 1 or self.fault_count < 0:
            raise ValueError("--requests and --concurrency must be positive, --fault-count not negative")
        for lo, hi in (self.prompt_words, self.max_tokens):
            if not 1 <= lo <= hi:
                raise ValueError(f"bad range {lo},{hi}: need 1 <= low <= high")
        if self.stage is not None and not 0 <= self.stage < self.min_serving:
            raise ValueError("--stage must name a stage the group serves with: 0 to --min-workers - 1")
        if self.freeze_seconds < 0 or self.cut_seconds < 0 or self.fault_gap < 0:
            raise ValueError("fault durations must not be negative")

    @property
    def min_serving(self) -> int:
        return self.min_workers if self.min_workers is not None else self.workers - 1


def options_from_args(args: argparse.Namespace) -> ChaosOptions:
    """The ``molink chaos`` arguments as options (ValueError: one line for the user)."""

    def pair(text: str, name: str) -> tuple[int, int]:
        try:
            lo, hi = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"--{name} wants LOW,HIGH (two integers), not {text!r}") from None
        return lo, hi

    try:
        kinds = tuple(FaultKind(x) for x in args.faults.split(",") if x)
    except ValueError:
        raise ValueError(f"--faults: known kinds are {', '.join(k.value for k in FaultKind)}") from None
    opts = ChaosOptions(
        model=args.model,
        workers=args.workers,
        min_workers=args.min_workers,
        requests=args.requests,
        concurrency=args.concurrency,
        seed=args.seed,
        stage=args.stage,
        faults=kinds,
        fault_count=args.fault_count if kinds else 0,
        fault_gap=args.fault_gap,
        freeze_seconds=args.freeze_seconds,
        cut_seconds=args.cut_seconds,
        cut_mode=CutMode(args.cut_mode),
        prompt_words=pair(args.prompt_words, "prompt-words"),
        max_tokens=pair(args.max_tokens, "max-tokens"),
        link_delay_ms=args.link_delay_ms,
        threads=args.threads,
        memory_limit_gb=args.memory_limit,
        out=Path(args.out),
        log_dir=Path(args.log_dir) if args.log_dir else None,
        check=args.check,
    )
    opts.validate()
    return opts
