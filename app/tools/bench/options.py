"""The options of `molink bench` and the link profiles: light, so the parser reads its defaults
without the simulator, torch or the bench code.

Contract: :class:`BenchOptions` is one bench run's configuration (which bench, which link
profiles and policies, the workload, the output folder); :data:`PROFILES` maps a profile name to
(Mbit/s, round-trip seconds); :data:`SIMULATED_REQUESTS` and :data:`SIMULATED_RATE` are the
workload of ``--simulate`` when none is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from master_core.scheduler import POLICIES

# name -> (Mbit/s, round-trip seconds); each direction gets half the round trip as delay
PROFILES: dict[str, tuple[float, float]] = {
    "lan": (1000.0, 0.0005),
    "wan": (100.0, 0.020),
    "slow": (20.0, 0.040),
    "home": (20.0, 0.080),  # issue 26's bursty run: 20 Mbit/s, 80 ms round trip
}


SIMULATED_REQUESTS = 400  # the simulator's default workload: many more requests than a real run
SIMULATED_RATE = 1.0  # requests per second with the simulator


@dataclass(frozen=True)
class BenchOptions:
    profiles: tuple[str, ...] = ("wan", "slow")
    policies: tuple[str, ...] = tuple(POLICIES)
    requests: int = 24  # per run (SIMULATED_REQUESTS with simulate)
    rate: float = 2.0  # requests per second, Poisson (SIMULATED_RATE with simulate)
    seed: int = 0
    repeats: int = 1  # real runs: the workload again with seeds seed+1, ...; the calibration's median error
    simulate: bool = False
    single: bool = False  # one request at a time vs single-process transformers
    burst: bool = False  # bursts of long prompts over short decode streams: gap p99/median per policy
    concurrent: int = 0  # N concurrent greedy clients vs one process serving them as one batch
    hops: bool = False  # one stream at a time, direct hops vs every hop relayed, per profile
    loop_back: bool = True  # the real benches' groups let the last stage feed tokens back (off: compare)
    out: Path = field(default_factory=lambda: Path("bench-results"))
    model: str = "default"
    workers: int = 3
    max_batch_tokens: int = 1024
    chat: bool = False  # a 5-turn conversation with and without prefix caching (app.tools.bench.chat)
    speculative: bool = False  # grounded and open tasks with and without speculation (app.tools.bench.speculative)
    # --speculative: also a draft model (a folder; "self": the served model drafts for itself, an upper
    # bound; "first:N": the served model's first N decoder layers); "": prompt lookup only
    draft_model: str = ""
    burst_prompts: tuple[int, ...] = ()  # --burst: the long prompts' lengths (empty: BurstShape's)
    burst_spacing: float = 0.0  # --burst: seconds between their arrivals (0: BurstShape's)
    burst_streams: int = 0  # --burst: short streams (0: BurstShape's)
