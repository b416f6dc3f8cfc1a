"""Synthetic chat-like traffic for benchmarks and the simulator.

Contract: pure and seeded.  ``make_workload(n, rate, seed)`` returns ``n`` requests with
Poisson arrivals at ``rate`` per second and long-tailed lengths like chat traffic: most
prompts short (log-normal around ``short_median`` tokens), a fraction long (uniform in
``long_range``), outputs log-normal around ``output_median``; all clamped to the limits.
``percentile`` is the nearest-rank percentile used by every report.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    arrival: float  # seconds after the start
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class WorkloadShape:
    short_median: int = 48
    long_fraction: float = 0.25
    long_range: tuple[int, int] = (400, 900)
    output_median: int = 48
    max_prompt: int = 1000
    max_output: int = 160


def make_workload(n: int, rate: float, seed: int, shape: WorkloadShape = WorkloadShape()) -> list[BenchRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        if rng.random() < shape.long_fraction:
            p = rng.randint(*shape.long_range)
        else:
            p = int(rng.lognormvariate(math.log(shape.short_median), 0.6))
        o = int(rng.lognormvariate(math.log(shape.output_median), 0.5))
        out.append(BenchRequest(t, max(4, min(shape.max_prompt, p)), max(4, min(shape.max_output, o))))
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def ttfts(arrivals: list[float], token_times: list[list[float]]) -> list[float]:
    """Each request's time to first token in seconds, in the order given: from its arrival
    (``arrivals[i]``) to its first token (``token_times[i][0]``), the values whose percentiles
    :func:`summarize` reports as ``ttft_p50`` and ``ttft_p99``.  Every request must have a token."""
    return [t[0] - a for a, t in zip(arrivals, token_times)]


def summarize(
    arrivals: list[float],
    token_times: list[list[float]],
    bytes_moved: int,
    busy: list[float],
    extra: dict | None = None,
) -> dict:
    """The benchmark figures of one run (times in seconds).

    ``token_times[i]`` are the times request i's tokens appeared; ``busy`` the seconds each
    resource (a stage's compute, a link direction, the shared CPU) was busy, so the pipeline
    bound is the throughput at which the busiest of them would be busy all the time.
    """
    start = min(arrivals)
    end = max(t[-1] for t in token_times)
    out_tokens = sum(len(t) for t in token_times)
    ttft = ttfts(arrivals, token_times)
    gaps = [b - a for t in token_times for a, b in zip(t, t[1:])]
    bottleneck = max(busy) if busy else 0.0
    out = {
        "requests": len(arrivals),
        "output_tokens": out_tokens,
        "seconds": end - start,
        "output_tokens_per_s": out_tokens / (end - start),
        "requests_per_s": len(arrivals) / (end - start),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile(gaps, 50),
        "tpot_p99": percentile(gaps, 99),
        "bytes_per_output_token": bytes_moved / max(1, out_tokens),
        "pipeline_bound_tokens_per_s": out_tokens / bottleneck if bottleneck > 0 else None,
    }
    if out["pipeline_bound_tokens_per_s"]:
        out["fraction_of_bound"] = out["output_tokens_per_s"] / out["pipeline_bound_tokens_per_s"]
    out.update(extra or {})
    return out
