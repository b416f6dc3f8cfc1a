"""The simulator's physics: stages, devices and links as event-driven resources.

Contract
--------
``Pipeline(costs, clock, on_back, feed, layers, master_seconds)`` carries steps
(:class:`SimStep`) through a modelled pipeline, one event at a time on ``clock``
(:class:`Clock`); :mod:`master_core.simulator` decides what to send, as the engine does.
``send(step)``: the master sends ``step`` now; ``on_back(step)`` is called when its result is
back at the master (``master_seconds`` after it arrived: sampling, bookkeeping); a step whose
``feeds_back`` is set is followed by ``feed(step)``, the next step, which its last stage sends
straight to the first stage (the loop-back), the master not crossed.

What is modelled, and after which code:

* **A stage** (:class:`_Stage`) serves its inbox by the worker's rule (:mod:`worker_core.inbox`):
  decode steps (every row one token continuing its request: ``SimStep.urgent``) before
  everything else, each class in arrival order, except that a step that has waited
  :data:`PATIENCE` seconds behind decode steps goes first.  A decode step runs whole.  Any other
  step runs a few layers at a time (:mod:`worker_core.interleave`: :class:`LayerClock` chooses
  the layers of a run from the stage's observed compute per token and layer, about
  ``PAUSE_SECONDS`` a run; it starts from the start-up profile's step and every size of the
  stage's measured curve, as the worker's has seen those steps and keeps the fastest); between
  two runs the stage serves the decode steps queued when the run ended (``Inbox.serve_urgent``),
  each whole, and those arriving meanwhile wait for the next pause.  ``layers`` gives each
  stage's layer count; empty, every step runs whole (no pauses).
  A step of ``n`` tokens costs ``fixed + per_token * n`` seconds of compute (``CostSnapshot``:
  the line the scheduler plans with), or, where ``curves`` are given, what the stage's measured
  curve says (:meth:`~master_core.costs.StageCost.curve`: the real engine plans with the line,
  its stages compute at the curve's cost), plus ``overhead`` seconds of the stage process's
  other work per step; split evenly over its layers.
* **A device** (:class:`_Device`) shares its ``slots`` between the stages computing on it
  (``CostSnapshot.devices``): each of ``k`` runs at ``min(1, free / k)`` of its speed
  (processor sharing: one-thread worker processes on a machine's cores, as the OS schedules
  them), where ``free`` is ``slots`` less the cores other work keeps busy on it (``busy``, per
  device: measured, e.g. the machine's other processes; none by default; or, for a single
  device, as it varied: ``busy_series``, (from this time on, cores) in time order).
* **A link direction** (:class:`_Link`) carries one frame at a time at the link's bandwidth and
  delivers it half the link's round trip later.  Both directions send decode steps' frames
  (and their results) before others queued, never interrupting the frame on the link, and send
  the others in pieces of ``PART_BYTES``, so a decode step's frame waits for one piece: a
  stage's up link as the worker's outbox (:mod:`worker_core.outbox`), a down link as the
  master's sends (:mod:`master_core.link`, the rule :func:`worker_core.pieces.passes`, since
  protocol 13; before, it sent frames whole in their order).  A hop
  from stage i to i + 1 is direct (stage i's up link, ``rtt_i / 2``) or relayed (up link i to
  the master, then down link i + 1); the loop-back goes over the last stage's up link.

Pure: no I/O, no wall clock, no torch.  Busy seconds per resource (``busy_compute``: work at full
speed; ``busy_up``, ``busy_down``) and bytes over the master's links and the hops (``bytes``)
are counted for the report.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from worker_core.interleave import LayerClock

from .costs import CostSnapshot, curve_seconds
from .scheduler import TOKEN_ID_BYTES, step_bytes

PART_BYTES = 16 * 1024  # worker_core.wire.PART_BYTES (a test checks they agree)
PATIENCE = 0.5  # seconds; worker_core.inbox.PATIENCE (that module imports torch; a test checks they agree)
PROFILE_TOKENS = 64  # the engine's start-up profile's largest step: what a stage's LayerClock first measures


def _nothing() -> None:
    """A piece before a frame's last arrived: the last one delivers the frame."""


class Clock:
    """The event queue: callbacks at times (seconds), run in time order, ties in the order given."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn))
        self._seq += 1

    def run(self) -> None:
        while self._heap:
            self.now, _, fn = heapq.heappop(self._heap)
            fn()


@dataclass(eq=False)
class SimStep:
    """One step of a micro-batch on its way (identity matters: the same step at every stage)."""

    tokens: int  # rows through every stage
    rows: int  # logits rows out of the last stage
    urgent: bool  # a decode step: every row one token continuing its request
    feeds_back: bool  # the last stage sends the next step straight to the first
    payload: object  # the simulator's: which micro-batch, which of its steps


class _Device:
    """Processor sharing of ``slots`` between the stages computing on one device."""

    def __init__(self, clock: Clock, slots: int, busy: float = 0.0) -> None:
        self.clock = clock
        self.slots = max(1, slots)
        self.free = max(0.05 * self.slots, self.slots - busy)  # cores left by other work (at least 5%)
        self._active: dict[int, list] = {}  # stage -> [work left at full speed (s), on_done]
        self._since = 0.0
        self._version = 0

    def set_busy(self, busy: float) -> None:
        """From now on other work keeps ``busy`` cores of this device busy."""
        self._advance()
        self.free = max(0.05 * self.slots, self.slots - busy)
        self._schedule()

    def _rate(self) -> float:
        return min(1.0, self.free / len(self._active)) if self._active else 1.0

    def _advance(self) -> None:
        now = self.clock.now
        done = (now - self._since) * self._rate()
        for seg in self._active.values():
            seg[0] -= done
        self._since = now

    def compute(self, stage: int, work: float, on_done: Callable[[], None]) -> None:
        """Stage ``stage`` computes ``work`` seconds (at full speed); ``on_done`` when finished."""
        self._advance()
        self._active[stage] = [max(0.0, work), on_done]
        self._schedule()

    def _schedule(self) -> None:
        self._version += 1
        if not self._active:
            return
        version, left = self._version, min(seg[0] for seg in self._active.values())
        self.clock.at(self.clock.now + max(0.0, left) / self._rate(), lambda: self._fire(version))

    def _fire(self, version: int) -> None:
        if version != self._version:
            return  # the sharing changed since: a later event stands for this one
        self._advance()
        least = min(seg[0] for seg in self._active.values())
        done = [s for s, seg in self._active.items() if seg[0] <= least + 1e-12]
        finished = [self._active.pop(s)[1] for s in done]
        self._schedule()
        for on_done in finished:
            on_done()


class _Link:
    """One direction of a link: one frame at a time at ``bandwidth``, delivered ``delay`` later;
    urgent frames before the others queued, the others in pieces (see the module docstring)."""

    def __init__(self, clock: Clock, bandwidth: float, delay: float) -> None:
        self.clock = clock
        self.bandwidth = bandwidth
        self.delay = delay
        self._urgent: deque[tuple[int, Callable[[], None]]] = deque()
        self._rest: deque[tuple[int, Callable[[], None]]] = deque()
        self._busy = False
        self.busy_seconds = 0.0
        self.bytes = 0

    def send(self, nbytes: int, urgent: bool, deliver: Callable[[], None]) -> None:
        if urgent:
            self._urgent.append((nbytes, deliver))
        else:  # in pieces: the last one delivers the frame
            whole, left = divmod(nbytes, PART_BYTES)
            sizes = [PART_BYTES] * whole + ([left] if left else [])
            self._rest.extend((n, _nothing) for n in sizes[:-1])
            self._rest.append((sizes[-1] if sizes else 0, deliver))
        if not self._busy:
            self._next()

    def _next(self) -> None:
        if not (self._urgent or self._rest):
            self._busy = False
            return
        nbytes, deliver = self._urgent.popleft() if self._urgent else self._rest.popleft()
        self._busy = True
        bw = self.bandwidth
        dur = nbytes / bw if math.isfinite(bw) and bw > 0 else 0.0
        self.busy_seconds += dur
        self.bytes += nbytes
        end = self.clock.now + dur
        self.clock.at(end + self.delay, deliver)
        self.clock.at(end, self._next)


class _State(Enum):
    IDLE = "waiting for a step"
    WHOLE = "computing a step whole (a decode step, or any step where layers are not modelled)"
    LAYERS = "computing a run of layers of a longer step"


class _Stage:
    """One stage: its inbox, the step it has open and the pause it is serving."""

    def __init__(self, pipe: Pipeline, index: int, layers: int) -> None:
        self.pipe = pipe
        self.index = index
        self.layers = layers  # 0: steps run whole
        self.state = _State.IDLE
        self.urgent: deque[SimStep] = deque()
        self.rest: deque[tuple[SimStep, float]] = deque()  # (step, when it arrived)
        self.current: SimStep | None = None  # the step computing now
        self.open: SimStep | None = None  # a longer step paused between its layers
        self.done_layers = 0
        self.run_layers = 0
        self.open_seconds = 0.0  # its compute so far (pauses excluded)
        self.run_began = 0.0
        self.pause: deque[SimStep] = deque()  # decode steps this pause serves
        self.clock = LayerClock()
        if layers:  # what the worker's clock has seen: the start-up profile, then the curve's sizes
            sizes = {PROFILE_TOKENS, *(round(x) for x, _ in (pipe.curves[index] if pipe.curves else ()))}
            for n in sorted(sizes):  # it keeps the fastest per token: big steps, whose fixed cost is shared
                self.clock.observe(n, layers, pipe.seconds(index, n))

    def arrive(self, step: SimStep) -> None:
        if step.urgent:
            self.urgent.append(step)
        else:
            self.rest.append((step, self.pipe.clock.now))
        if self.state is _State.IDLE:
            self._next()

    def _next(self) -> None:
        """The worker's execute loop takes the next message (``Inbox.get``)."""
        now = self.pipe.clock.now
        if self.urgent and self.rest and now - self.rest[0][1] >= PATIENCE:
            self._begin(self.rest.popleft()[0])
        elif self.urgent:
            self._whole(self.urgent.popleft())
        elif self.rest:
            self._begin(self.rest.popleft()[0])
        else:
            self.state = _State.IDLE

    def _whole(self, step: SimStep) -> None:
        self.state, self.current = _State.WHOLE, step
        self.pipe.compute(self.index, self.pipe.seconds(self.index, step.tokens), self._computed)

    def _begin(self, step: SimStep) -> None:
        if step.urgent or not self.layers:
            self._whole(step)
            return
        self.open, self.done_layers, self.open_seconds = step, 0, 0.0
        self._run()

    def _run(self) -> None:
        assert self.open is not None
        step = self.open
        self.run_layers = min(self.layers - self.done_layers, self.clock.layers(step.tokens, self.layers))
        self.state, self.current, self.run_began = _State.LAYERS, step, self.pipe.clock.now
        work = self.pipe.seconds(self.index, step.tokens) * self.run_layers / self.layers
        self.pipe.compute(self.index, work, self._computed)

    def _computed(self) -> None:
        step = self.current
        assert step is not None
        if self.state is _State.LAYERS:
            self.done_layers += self.run_layers
            self.open_seconds += self.pipe.clock.now - self.run_began
            if self.done_layers >= self.layers:
                self.clock.observe(step.tokens, self.layers, self.open_seconds)
                self.open = None
                self.pipe.forward(self.index, step)
                self._next()
                return
            self.pause = deque(self.urgent)  # serve_urgent: those queued now; later ones wait
            self.urgent.clear()
        else:
            self.pipe.forward(self.index, step)
        if self.pause:
            self._whole(self.pause.popleft())
        elif self.open is not None:
            self._run()
        else:
            self._next()


class Pipeline:
    """The stages, devices and links of one modelled pipeline (see the module docstring)."""

    def __init__(
        self,
        costs: CostSnapshot,
        clock: Clock,
        on_back: Callable[[SimStep], None],
        feed: Callable[[SimStep], SimStep],
        layers: tuple[int, ...] = (),
        master_seconds: float = 0.0,
        curves: tuple[tuple[tuple[float, float], ...], ...] = (),
        busy: tuple[float, ...] = (),
        overhead: float = 0.0,
        busy_series: tuple[tuple[float, float], ...] = (),
    ) -> None:
        c = self.costs = costs
        self.curves = curves
        self.overhead = overhead
        self.clock = clock
        self.on_back = on_back
        self.feed = feed
        self.master_seconds = master_seconds
        if layers and len(layers) != c.stages:
            raise ValueError(f"layers names {len(layers)} stages; the costs have {c.stages}")
        if curves and (len(curves) != c.stages or not all(curves)):
            raise ValueError(f"curves names {len(curves)} stages (each needs points); the costs have {c.stages}")
        self.down = [_Link(clock, c.link_bandwidth[i], c.link_rtt[i] / 2) for i in range(c.stages)]
        self.up = [_Link(clock, c.link_bandwidth[i], c.link_rtt[i] / 2) for i in range(c.stages)]
        self.device_of = [0] * c.stages
        self.devices: list[_Device] = []
        for d, (stages, slots) in enumerate(c.device_groups()):
            for i in stages:
                self.device_of[i] = d
            self.devices.append(_Device(clock, slots, busy[d] if d < len(busy) else 0.0))
        for t, cores in busy_series:  # the other work as it varied (one device)
            clock.at(t, lambda cores=cores: self.devices[0].set_busy(cores))
        self.busy_compute = [0.0] * c.stages
        self.stages = [_Stage(self, i, layers[i] if layers else 0) for i in range(c.stages)]

    @property
    def bytes(self) -> int:
        return sum(link.bytes for link in (*self.down, *self.up))

    @property
    def busy_up(self) -> list[float]:
        return [link.busy_seconds for link in self.up]

    @property
    def busy_down(self) -> list[float]:
        return [link.busy_seconds for link in self.down]

    def seconds(self, stage: int, tokens: int) -> float:
        """Compute seconds of a step of ``tokens`` on ``stage`` at full speed: read from the
        stage's measured curve where one is given, else the cost line; plus ``overhead``, the
        CPU a stage's process spends on a step beyond its compute (receiving, encoding, sending)."""
        if self.curves:
            return curve_seconds(self.curves[stage], tokens) + self.overhead
        return self.costs.stage_fixed[stage] + self.costs.stage_per_token[stage] * tokens + self.overhead

    def compute(self, stage: int, work: float, on_done: Callable[[], None]) -> None:
        self.busy_compute[stage] += work
        self.devices[self.device_of[stage]].compute(stage, work, on_done)

    def send(self, step: SimStep) -> None:
        """The master sends ``step`` (token ids over the first stage's down link)."""
        nbytes = step_bytes(self.costs, 0, step.tokens, step.rows)[0]
        self.down[0].send(nbytes, step.urgent, lambda: self.stages[0].arrive(step))

    def forward(self, stage: int, step: SimStep) -> None:
        """``stage`` has computed ``step``: its output goes on (or back, and fed back)."""
        c = self.costs
        out = step_bytes(c, stage, step.tokens, step.rows)[1]
        if stage + 1 < c.stages:
            nxt = self.stages[stage + 1]
            if c.direct_into(stage + 1):
                self.up[stage].send(out, step.urgent, lambda: nxt.arrive(step))
            else:
                relayed = step_bytes(c, stage + 1, step.tokens, step.rows)[0]
                down = self.down[stage + 1]
                self.up[stage].send(out, step.urgent, lambda: down.send(relayed, step.urgent, lambda: nxt.arrive(step)))
            return
        if step.feeds_back:  # the drawn tokens go straight back to the first stage, before the result
            fed = self.feed(step)
            self.up[stage].send(step.tokens * TOKEN_ID_BYTES, True, lambda: self.stages[0].arrive(fed))
        self.up[stage].send(out, step.urgent, self._back(step))

    def _back(self, step: SimStep) -> Callable[[], None]:
        def arrived() -> None:
            self.clock.at(self.clock.now + self.master_seconds, lambda: self.on_back(step))

        return arrived
