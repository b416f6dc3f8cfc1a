"""Micro-batches in flight chosen by what they deliver (the scheduler's count, tuned online).

Contract
--------
The cost model (:func:`master_core.scheduler.microbatch_count`) knows which stages share a device
but not how well they share it (cores, caches, memory bandwidth), nor every cost of a step.
:class:`MicrobatchTuner` starts from the model's count and hill-climbs K online from the tokens per
second the engine reports (bounded, with hysteresis, per load).  Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections import deque


class MicrobatchTuner:
    """Micro-batches in flight chosen by what they deliver: a bounded hill-climb over K.

    Pure (no clock, no I/O): the engine asks :meth:`choose` for K (giving the cost model's
    count and the load) and reports every finished micro-batch to :meth:`observe` with its
    own clock's time.  Per load (``key``, e.g. the pipeline's epoch and the number of running
    requests) the tuner starts at the model's K, measures output tokens per second over
    periods of at least ``period_steps`` micro-batches and ``min_period`` seconds (periods
    where K or the load changed, or prefill rode along, are discarded: they measure something
    else; so is the first period of a load, a transition), then probes a neighbour (K - 1
    first: fewer, larger micro-batches), moves there when it delivers more than ``gain``
    better, or, for a smaller K, when it delivers at least ``1 - tie`` as much (fewer steps
    cost the master and the links less for the same delivery); it keeps climbing in that
    direction, and after a failed probe stays ``hold`` periods (doubling, up to 8x, while probes
    keep failing) before probing again.  A K's rate is the median of its last three periods
    (measurements on a shared machine are noisy).  For a fixed load, more tokens per second is
    also a shorter gap between a stream's tokens, so throughput is the one criterion.  The
    best K found for a load is remembered and is where that load starts next time.  K stays
    within [1, min(max_k, running requests)].
    """

    def __init__(
        self,
        max_k: int = 16,
        period_steps: int = 12,
        min_period: float = 1.5,
        gain: float = 0.08,
        tie: float = 0.03,
        hold: int = 6,
    ) -> None:
        self.max_k, self.period_steps, self.min_period = max_k, period_steps, min_period
        self.gain, self.tie, self.hold_periods = gain, tie, hold
        self._warm = False  # the current load's first period (a transition) is done
        self._failed = 0  # probes failed in a row at this load
        self._key: object = None
        self._cap = 1
        self._home = 1
        self._probe: int | None = None
        self._direction = -1
        self._hold = 0
        self._rates: dict[int, deque[float]] = {}  # K -> last tokens/s measured at the current load
        self._best: dict[object, int] = {}  # load -> best K found
        self._start: float | None = None  # the current period: first completion's time
        self._tokens = 0
        self._steps = 0
        self.moves = 0  # times K changed by measurement (diagnostics)

    @property
    def current(self) -> int:
        return self._probe if self._probe is not None else self._home

    def _clamp(self, k: int) -> int:
        return max(1, min(self._cap, k))

    def choose(self, model_k: int, key: object, active: int) -> int:
        """K to keep in flight now, for the load ``key`` with ``active`` running requests."""
        if key != self._key:
            if self._key is not None:
                self._best[self._key] = self._home
            self._key = key
            self._cap = max(1, min(self.max_k, active))
            self._home = self._clamp(self._best.get(key, model_k))
            self._probe, self._hold, self._rates, self._direction, self._warm = None, 0, {}, -1, False
            self._failed = 0
            self._restart()
        elif not self._rates and key not in self._best and self._clamp(model_k) != self._home:
            self._home = self._clamp(model_k)  # nothing measured yet: follow the model
            self._restart()
        return self.current

    def _restart(self) -> None:
        self._start, self._tokens, self._steps = None, 0, 0

    def observe(self, now: float, key: object, k: int, tokens: int, prefill: bool) -> None:
        """A micro-batch planned with ``k`` in flight under load ``key`` finished at ``now``
        (seconds, any monotonic clock) and produced ``tokens`` output tokens."""
        if key != self._key or k != self.current or prefill:
            self._restart()  # it measures another K, another load, or prefill: start over
            return
        if self._start is None:
            self._start = now  # tokens are counted from the next completion on
            return
        self._tokens += tokens
        self._steps += 1
        elapsed = now - self._start
        if self._steps < max(self.period_steps, 2 * k) or elapsed < self.min_period:
            return
        rate = self._tokens / elapsed if elapsed > 0 else 0.0
        self._restart()
        self._decide(k, rate)

    def _rate(self, k: int) -> float:
        got = sorted(self._rates.get(k, ()))
        return got[len(got) // 2] if got else 0.0

    def _decide(self, k: int, rate: float) -> None:
        if not self._warm:
            self._warm = True  # the load's first period is a transition: not a measurement
            return
        self._rates.setdefault(k, deque(maxlen=3)).append(rate)
        if self._probe is not None:
            home, probe = self._rate(self._home), self._rate(self._probe)
            if probe > home * (1 + self.gain) or (self._probe < self._home and probe >= home * (1 - self.tie)):
                self._home = self._probe  # better: move, and keep climbing this way
                self.moves += 1
                self._failed = 0
                nxt = self._home + self._direction
                self._probe = nxt if 1 <= nxt <= self._cap else None
                if self._probe is None:  # at the edge: the other side was just measured worse
                    self._direction, self._hold = -self._direction, self.hold_periods
            else:
                self._probe = None  # not better: back home, try the other side after a while
                self._direction = -self._direction
                self._hold = min(8 * self.hold_periods, self.hold_periods << self._failed)
                self._failed = min(self._failed + 1, 3)  # probes that keep failing come ever more rarely
            return
        if self._hold > 0:
            self._hold -= 1
            return
        for direction in (self._direction, -self._direction):
            nxt = self._home + direction
            if 1 <= nxt <= self._cap:
                self._direction, self._probe = direction, nxt
                return

    def describe(self) -> dict:
        return {
            "k": self.current,
            "home": self._home,
            "rates": {k: self._rate(k) for k in self._rates},
            "moves": self.moves,
        }
