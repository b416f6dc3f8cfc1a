"""Measured costs of the pipeline: per-stage compute time and per-link RTT and bandwidth.

Contract: pure bookkeeping, fed by the relay with what really happened, read by the
scheduler; nothing is assumed.  ``StageCost`` fits ``seconds = fixed + per_token * tokens``
(ordinary least squares; one size seen: a proportional model) through the fastest recent
observation of each size class: stages that share a machine's cores slow each other's steps
down, and that contention must not pass for a per-token cost (it made chunks ever smaller).
``LinkCost`` fits the time a step spends on a master<->worker link beyond the worker's
compute, ``seconds = rtt + bytes / bandwidth``, from the same kind of observations; that time
also holds the wait behind other frames in the link's queues (queueing only adds), so the
link is fitted through the fastest recent observation of each size class (sizes a factor 2
apart), the lower envelope, not through the mean: a burst of large frames must not pass for
a slow link or a long round trip.
``StageCost.slowdown()`` says how much slower than that envelope the stage runs now (the
worst of its last steps, at least 1): deadlines scale by it, the scheduler's plans do not.
``shared_devices(hellos)`` tells from the workers' announcements which stages share a device.
Before enough variety is seen, estimates are ``None``; a start-up profile (steps of several
sizes) gives them their first values, and online refinement keeps them current.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the wire module imports torch; this one stays pure
    from worker_core.wire import Hello

SLOWDOWN_WINDOW = 16  # recent steps whose observed/predicted compute give a stage's slowdown


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``y = a + b x`` (a, b >= 0) through ``points``; one size only: proportional."""
    n = len(points)
    if n == 0:
        return None
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx <= 1e-12 * max(1.0, mx * mx):  # one size only: proportional through the origin
        return (0.0, my / mx) if mx > 0 else (my, 0.0)
    b = max(0.0, sum((p[0] - mx) * (p[1] - my) for p in points) / sxx)
    return max(0.0, my - b * mx), b


class _Envelope:
    """The fastest recent observation of each size class (sizes a factor 2 apart), and the
    line through them: waiting behind other work only adds time, so the fastest is the cost.
    The line is computed again only after a new observation (the engine asks once per
    micro-batch and lane, far more often than steps end)."""

    PER_CLASS = 32  # recent observations kept per size class

    def __init__(self) -> None:
        self._classes: dict[int, deque[tuple[float, float]]] = {}
        self._line: tuple[float, float] | None = None
        self._stale = False

    def add(self, size: float, seconds: float) -> None:
        key = max(0, int(size)).bit_length()
        self._classes.setdefault(key, deque(maxlen=self.PER_CLASS)).append((float(size), float(seconds)))
        self._stale = True

    def points(self) -> tuple[tuple[float, float], ...]:
        """The fastest recent observation of each size class, smallest size first."""
        return tuple(sorted(min(points, key=lambda p: p[1]) for points in self._classes.values()))

    def fit(self) -> tuple[float, float] | None:
        if self._stale:
            self._line = _line([min(points, key=lambda p: p[1]) for points in self._classes.values()])
            self._stale = False
        return self._line


class StageCost:
    """A stage's forward time; the stages of one machine slow each other down (a step that
    ran beside another stage's large step takes longer), so the fit is the envelope too."""

    def __init__(self) -> None:
        self._fit = _Envelope()
        self._slow: deque[float] = deque(maxlen=SLOWDOWN_WINDOW)  # observed / predicted, recent steps

    def observe(self, tokens: int, seconds: float) -> None:
        predicted = self.predict(tokens)
        if predicted is not None and predicted > 0:
            self._slow.append(seconds / predicted)
        self._fit.add(tokens, seconds)

    def slowdown(self) -> float:
        """How much slower than the fit this stage computes now (at least 1): the largest ratio
        of observed over predicted seconds (the prediction made before the step was added to
        the fit) among its last ``SLOWDOWN_WINDOW`` steps.  The fit follows the fastest
        observations (and takes a size seen only under load as that size's cost), so on a
        machine whose other work grows it lags behind; a deadline scaled by this does not take
        a busy stage for a hung one."""
        return max(1.0, *self._slow) if self._slow else 1.0

    def estimate(self) -> tuple[float, float] | None:
        """(fixed seconds per step, seconds per token)."""
        return self._fit.fit()

    def predict(self, tokens: int) -> float | None:
        f = self._fit.fit()
        return None if f is None else f[0] + f[1] * tokens

    def curve(self) -> tuple[tuple[float, float], ...]:
        """The envelope itself: (tokens, seconds) of the fastest recent step of each size class,
        smallest first.  The line through it (:meth:`estimate`, what the scheduler plans with)
        is led by the largest steps; on a CPU a step's cost grows faster than linearly in its
        tokens and a one-row step pays a fixed cost the line does not see (measured: 15 ms
        against 1.5 ms predicted), so what a step really costs is read from here
        (:func:`curve_seconds`; the simulator's physics)."""
        return self._fit.points()


def curve_seconds(curve: Sequence[tuple[float, float]], tokens: float) -> float:
    """Seconds of a step of ``tokens`` read from a measured ``curve`` (:meth:`StageCost.curve`).

    Every point is an upper bound of its size's cost (waiting only adds), and a step of more
    tokens is never cheaper, so a point is lowered to the fastest of the points at or beyond its
    size (a size class seen rarely, and only under load, does not raise its neighbours).  Linear
    between the points, flat below the first, and beyond the last along the slope from the
    largest point at most half its size (the first point when none is): the two largest points
    are often a few tokens apart (sizes either side of a class boundary), and the slope between
    them, extrapolated a hundred tokens on, put a 353-token step at 0.68 s that measured 0.36."""
    if not curve:
        raise ValueError("an empty curve")
    pts: list[tuple[float, float]] = []
    for x, y in sorted(curve, reverse=True):
        pts.append((x, min(y, pts[-1][1]) if pts else y))
    pts.reverse()
    if tokens <= pts[0][0] or len(pts) == 1:
        x0, y0 = pts[0]
        return y0 if tokens <= x0 else y0 * tokens / x0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if tokens <= x1:
            return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0) if x1 > x0 else y1
    x1, y1 = pts[-1]
    x0, y0 = next((p for p in reversed(pts) if p[0] <= x1 / 2), pts[0])
    return y1 + (y1 - y0) / (x1 - x0) * (tokens - x1) if x1 > x0 else y1 * tokens / x1


class LinkCost:
    def __init__(self) -> None:
        self._fit = _Envelope()

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
    # the hardware the stages compute on: per stage, the index of its device (stages with the
    # same index share it: several workers on one machine's CPU, one GPU serving two ranges),
    # and per device index how many steps it runs side by side (a CPU's cores over a worker's
    # threads; a GPU 1).  Empty: every stage has a device of its own.
    devices: tuple[int, ...] = ()
    device_slots: tuple[int, ...] = ()
    # per hop i -> i+1 (stages - 1 of them): True when stage i sends straight to stage i+1 over its
    # own link (one crossing, rtt_i / 2), False when the master relays it (up link i, then down link
    # i+1: two crossings).  Empty: every hop relayed.
    direct: tuple[bool, ...] = ()
    # decode steps loop back: the last stage draws their tokens and sends the next step straight
    # to the first stage over its own link (half its round trip, a few bytes a token); the master
    # only reads the results (``Engine._loop_steps``, at most ``LOOP_STEPS`` steps in a row)
    loop_back: bool = False
    # the loop-back goes through a relay (``routes.Hop.through``): it crosses the first stage's own
    # link too, so a looped step pays that link's down half as a step from the master does
    loop_back_relayed: bool = False

    def __post_init__(self) -> None:
        if self.direct and len(self.direct) != self.stages - 1:
            raise ValueError(f"direct names {len(self.direct)} hops; {self.stages} stages have {self.stages - 1}")

    @property
    def stages(self) -> int:
        return len(self.stage_fixed)

    def direct_into(self, stage: int) -> bool:
        """Does ``stage``'s input come straight from the previous stage (not over its own link)?"""
        return 0 < stage <= len(self.direct) and self.direct[stage - 1]

    def device_groups(self) -> list[tuple[tuple[int, ...], int]]:
        """(the stages of one device, how many steps it runs at once), one entry per device."""
        if len(self.devices) != self.stages:
            return [((i,), 1) for i in range(self.stages)]
        groups: dict[int, list[int]] = {}
        for stage, device in enumerate(self.devices):
            groups.setdefault(device, []).append(stage)
        return [
            (tuple(stages), max(1, self.device_slots[d] if d < len(self.device_slots) else 1))
            for d, stages in groups.items()
        ]


def shared_devices(hellos: Sequence[Hello]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``CostSnapshot.devices`` and ``device_slots`` from the stages' announcements: workers
    naming the same ``machine`` and device share one device (unnamed ones have their own); a
    CPU runs ``cores // threads`` steps side by side (one when a worker uses every core), a
    GPU one."""
    index: dict[tuple[str, str], int] = {}
    devices: list[int] = []
    slots: list[int] = []
    for i, h in enumerate(hellos):
        key = (h.machine, h.device) if h.machine else (f"#{i}", h.device)
        if key not in index:
            index[key] = len(slots)
            on_cpu = h.device == "cpu" and h.threads > 0
            slots.append(max(1, h.cpu_cores // h.threads) if on_cpu else 1)
        devices.append(index[key])
    return tuple(devices), tuple(slots)
