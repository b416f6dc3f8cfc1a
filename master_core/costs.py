"""Measured costs of the pipeline: per-stage compute time and per-link RTT and bandwidth.

Contract: pure bookkeeping, fed by the relay with what really happened, read by the
scheduler; nothing is assumed.  ``StageCost`` fits ``seconds = fixed + per_token * tokens``
over the last observations (ordinary least squares; one size seen: a proportional model).
``LinkCost`` fits the time a step spends on a master<->worker link beyond the worker's
compute, ``seconds = rtt + bytes / bandwidth``, from the same kind of observations.
Before enough variety is seen, estimates are ``None``; a start-up profile (steps of several
sizes) gives them their first values, and online refinement keeps them current.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class _LineFit:
    """y = a + b x over a sliding window of observations."""

    def __init__(self, window: int = 256) -> None:
        self.points: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, x: float, y: float) -> None:
        self.points.append((float(x), float(y)))

    def fit(self) -> tuple[float, float] | None:
        n = len(self.points)
        if n == 0:
            return None
        mx = sum(p[0] for p in self.points) / n
        my = sum(p[1] for p in self.points) / n
        sxx = sum((p[0] - mx) ** 2 for p in self.points)
        if sxx <= 1e-12 * max(1.0, mx * mx):  # one size only: proportional through the origin
            return (0.0, my / mx) if mx > 0 else (my, 0.0)
        b = sum((p[0] - mx) * (p[1] - my) for p in self.points) / sxx
        b = max(b, 0.0)
        a = max(0.0, my - b * mx)
        return a, b


class StageCost:
    def __init__(self) -> None:
        self._fit = _LineFit()

    def observe(self, tokens: int, seconds: float) -> None:
        self._fit.add(tokens, seconds)

    def estimate(self) -> tuple[float, float] | None:
        """(fixed seconds per step, seconds per token)."""
        return self._fit.fit()

    def predict(self, tokens: int) -> float | None:
        f = self._fit.fit()
        return None if f is None else f[0] + f[1] * tokens


class LinkCost:
    def __init__(self) -> None:
        self._fit = _LineFit()

    def observe(self, nbytes: int, seconds: float) -> None:
        self._fit.add(nbytes, seconds)

    def estimate(self) -> tuple[float, float] | None:
        """(round-trip seconds, bytes per second); bandwidth inf when no size dependence is seen."""
        f = self._fit.fit()
        if f is None:
            return None
        rtt, per_byte = f
        return rtt, (1.0 / per_byte if per_byte > 0 else float("inf"))


@dataclass(frozen=True)
class CostSnapshot:
    """What the scheduler needs, per stage in pipeline order (seconds, bytes/s)."""

    stage_fixed: tuple[float, ...]
    stage_per_token: tuple[float, ...]
    link_rtt: tuple[float, ...]
    link_bandwidth: tuple[float, ...]
    hidden_bytes_per_token: int  # activation bytes per token between stages
    logits_bytes_per_row: int  # bytes of one logits row from the last stage

    @property
    def stages(self) -> int:
        return len(self.stage_fixed)
