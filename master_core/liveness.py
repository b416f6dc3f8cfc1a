"""The master's liveness rule for one worker tunnel: when a worker counts as hung.

Contract
--------
A :class:`Liveness` is fed what the link hears (:meth:`Liveness.heard`: any byte of the worker,
a pong included; :meth:`Liveness.answered`: a step's ``Result`` or ``Failure``; :meth:`Liveness.pulse`:
a pong's payload, :func:`worker_core.wire.pulse`) and judged every ``PING_INTERVAL`` by
:meth:`Liveness.hung`, which says why the worker counts as hung at a moment, or None.  Hung:

* **silent** (no byte at all) longer than :meth:`Liveness.silent_limit`: ``LOADING_SILENT_LIMIT``
  while it loads an assignment; otherwise ``SILENT_MARGIN`` times the longest silence this link
  showed in the last ``SILENCE_WINDOW`` seconds while it was alive, never below
  ``SILENT_FLOOR`` nor above ``SILENT_LIMIT`` (which also holds until the link was heard alive
  for ``SILENCE_LEARNING`` seconds: before it has shown its pace).  A live worker answers the
  master's pings from its event loop while its stage computes on another thread, so the
  longest silence of a live link is about a ping interval plus its pong's delay; one silent for
  several times that is stopped (SIGSTOP, a closed laptop lid), its loop is stuck, or the path
  to it is gone.  A busy machine that delays its pongs raises its own limit;
* **computing without progress**: its pulses show one compute call running
  :meth:`Liveness.stuck_limit` (``STUCK_LIMIT`` beyond the predicted compute of the largest step
  it has, scaled by the stage's slowdown) while it has steps: a stuck compute behind a live loop;
* a step **unanswered** (no ``Result`` or ``Failure`` from this link since it went out, a late
  one of a step given up on included: the stage computed it, and the steps queued behind it
  start only then) past the step's deadline (set by the link from its measured costs).

:meth:`Liveness.stalled` restarts the clocks when the master's own loop stalled (frames may be
waiting unread: nothing is judged on such a tick).  Pure: the caller passes the clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Protocol

from worker_core.wire import read_pulse

from .costs import StageCost

PING_INTERVAL = 0.25  # seconds between the master's pings on a tunnel (also the judging tick)
SILENT_LIMIT = 2.0  # seconds of silence after which a link is hung at most (and before it showed its pace)
SILENT_FLOOR = 1.0  # ... and at least
SILENT_MARGIN = 2.5  # ... otherwise this many times the longest silence it showed alive recently
SILENCE_WINDOW = 60.0  # seconds of a link's recent silences its limit follows
SILENCE_LEARNING = 10.0  # seconds a link is heard alive before its limit follows its pace
LOADING_SILENT_LIMIT = 15.0  # the limit while it loads an assignment (weight files may stall its loop)
# A stage whose loop answers pings but whose compute is stuck (a hung driver): its pongs carry its
# compute progress (wire.pulse).  A compute call is a few layers sized to take about 20 ms
# (worker_core.interleave) or a whole decode step, so one that runs this much beyond its predicted
# time (scaled by the stage's slowdown: a busy machine still finishes its calls) is stuck.
STUCK_LIMIT = 3.0  # seconds
UNMEASURED_COMPUTE = 30.0  # seconds a compute call may take before the stage's costs are measured


class Waiting(Protocol):
    """A step out on the link: when it went (``inf``: not yet), its deadline, its rows."""

    sent_at: float
    deadline: float
    tokens: int


class Liveness:
    def __init__(self, now: float) -> None:
        self.heard_at = now  # the last byte of any kind from the worker (pongs too)
        self.answered_at = 0.0  # the last Result or Failure of a step
        self._learnt = 0.0  # seconds the link was heard alive (serving or standing by)
        # (when it ended, seconds) of its recent silences, each longer than every later one: the
        # first is the longest in the window
        self._longest: deque[tuple[float, float]] = deque()
        self._progress = -1  # the stage's compute calls finished, as its last pulse said
        self.stuck_since: float | None = None  # since when its pulses say one compute call runs, unfinished

    def heard(self, now: float, alive: bool = True) -> None:
        """A byte of the worker arrived at ``now``.  ``alive``: the silence it ends is one of a
        live, serving worker (not one loading an assignment), so it sets the pace."""
        silence = now - self.heard_at
        if alive:
            self._learnt += silence
            while self._longest and self._longest[-1][1] <= silence:
                self._longest.pop()
            self._longest.append((now, silence))
        self.heard_at = now

    def answered(self, now: float) -> None:
        self.answered_at = now

    def pulse(self, data: bytes, now: float) -> None:
        """A pong's pulse: while the stage's pulses show the same compute call running, it is
        stuck since the first of them."""
        pulse = read_pulse(data)
        if pulse is None or not pulse[1]:
            self.stuck_since = None
        elif pulse[0] != self._progress or self.stuck_since is None:
            self.stuck_since = now
        if pulse is not None:
            self._progress = pulse[0]

    def stalled(self, now: float) -> None:
        """The master's own loop stalled: its clocks restart at ``now``."""
        self.heard_at = self.answered_at = now
        if self.stuck_since is not None:
            self.stuck_since = now

    def silent_limit(self, now: float, loading: bool) -> float:
        """Seconds of silence after which the link is hung at ``now`` (see the module doc)."""
        if loading:
            return LOADING_SILENT_LIMIT
        if self._learnt < SILENCE_LEARNING:
            return SILENT_LIMIT
        while self._longest and self._longest[0][0] < now - SILENCE_WINDOW:
            self._longest.popleft()
        longest = self._longest[0][1] if self._longest else PING_INTERVAL
        return min(SILENT_LIMIT, max(SILENT_FLOOR, SILENT_MARGIN * longest))

    @staticmethod
    def stuck_limit(pending: Mapping[int, Waiting], cost: StageCost) -> float:
        """Seconds one compute call may run before the stage counts as stuck: ``STUCK_LIMIT``
        beyond the predicted compute of the largest step it has (scaled by its slowdown)."""
        tokens = max((p.tokens for p in pending.values()), default=1)
        compute = cost.predict(tokens)
        if compute is None:
            return STUCK_LIMIT + UNMEASURED_COMPUTE
        return STUCK_LIMIT + compute * cost.slowdown()

    def hung(self, now: float, loading: bool, pending: Mapping[int, Waiting], cost: StageCost) -> str | None:
        """Why the link counts as hung at ``now`` (monotonic), or None (the rule of the module
        doc).  ``loading``: an assignment is being loaded; ``pending``: its steps out, by id."""
        limit = self.silent_limit(now, loading)
        silent = now - self.heard_at
        if silent > limit:
            return f"silent for {silent:.1f} s (limit {limit:.1f} s)"
        if pending and self.stuck_since is not None:
            stuck = self.stuck_limit(pending, cost)
            if now - self.stuck_since > stuck:
                return f"computing without progress for {now - self.stuck_since:.1f} s (limit {stuck:.1f} s)"
        if pending:
            step_id, oldest = min(pending.items(), key=lambda kv: kv[1].sent_at)
            waited = now - max(oldest.sent_at, self.answered_at)
            if waited > oldest.deadline:
                return f"step {step_id} unanswered for {waited:.1f} s (deadline {oldest.deadline:.1f} s)"
        return None
