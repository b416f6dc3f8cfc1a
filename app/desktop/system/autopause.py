"""Auto-pause: leave the group while this PC's owner needs the GPU, come back when they are done.

Contract
--------
* :class:`GpuLoad` is one observation: GPU utilisation (percent, None if unknown), the number and
  memory (bytes) of GPU processes that are not ours, and whether a fullscreen app runs.
* :class:`AutoPause` is the pure policy (no clock, no I/O: ``now`` is passed in, monotonic seconds).
  ``update(load, now)`` returns a :class:`Decision` for the controller to act on once:

  - ``WARN``: the GPU just became busy (a foreign process above ``threshold_util`` percent, or a
    fullscreen app): the app shows a warning with "Keep sharing";
  - ``PAUSE``: still busy ``warn_seconds`` after the warning: leave the group gracefully;
  - ``RESUME``: paused by this policy and clear for ``clear_seconds``: join again;
  - ``NONE`` otherwise.

  ``keep_sharing(now)`` records that the user chose to keep sharing: no pause until the current
  busy episode has ended (the GPU clear for ``clear_seconds``).  An unknown load (``None``: no NVML,
  a driver error) never starts a warning or a pause, and cancels a pending warning; it does not
  count as clear time for a resume either.  Manual user actions win: the controller does not call
  ``update`` while the user paused by hand, and calls :meth:`reset` when the user resumes or stops.
  All transitions are in :meth:`AutoPause.update`'s one table, ``_NEXT``.
* :func:`probe_gpu_load` reads NVML (``pynvml`` from nvidia-ml-py): utilisation of every GPU (the
  highest) and the graphics and compute processes not in ``own_pids``; any NVML error or no driver
  gives None (unknown), except that a fullscreen app, which Windows reports without NVML, still gives
  a load with ``utilization=None, fullscreen=True``.  It blocks for a few milliseconds per GPU: call
  it from a timer, not in a tight loop.
* :func:`fullscreen_app_running` asks Windows (:mod:`app.desktop.system._windows_fullscreen`); False elsewhere.

Busy means: ``fullscreen``, or a foreign GPU process exists while utilisation is at least
``threshold_util``.  Our own worker's load alone is never "busy" (its processes are in ``own_pids``);
utilisation without any foreign process is ours.  On Windows WDDM drivers NVML may not list
graphics processes; a fullscreen game is still seen through ``fullscreen``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger("molink.autopause")


@dataclass(frozen=True)
class GpuLoad:
    utilization: float | None  # percent 0..100 of the busiest GPU; None = unknown
    foreign_processes: int  # GPU processes (graphics or compute) that are not ours
    foreign_memory: int  # bytes those processes use (0 where the driver does not say)
    fullscreen: bool  # a fullscreen / presentation / D3D exclusive app runs


class Decision(Enum):
    NONE = "none"
    WARN = "warn"
    PAUSE = "pause"
    RESUME = "resume"


class _Phase(Enum):
    IDLE = "idle"  # sharing, GPU clear
    WARNED = "warned"  # sharing, busy since ``since``; pause at since + warn_seconds
    KEPT = "kept"  # sharing, busy, the user said keep sharing for this episode
    PAUSED = "paused"  # paused by this policy, still busy
    CLEARING = "clearing"  # paused by this policy, clear since ``since``; resume at since + clear_seconds
    KEPT_CLEARING = "kept-clearing"  # kept sharing, clear since ``since``; the episode ends at + clear_seconds


class _Obs(Enum):
    BUSY = "busy"
    CLEAR = "clear"
    UNKNOWN = "unknown"


# (phase, observation) -> (next phase, reset the episode clock?, decision if no timer fires)
# Timers (warn -> pause, clearing -> resume, kept-clearing -> idle) are checked in update().
_NEXT: dict[tuple[_Phase, _Obs], tuple[_Phase, bool, Decision]] = {
    (_Phase.IDLE, _Obs.BUSY): (_Phase.WARNED, True, Decision.WARN),
    (_Phase.IDLE, _Obs.CLEAR): (_Phase.IDLE, False, Decision.NONE),
    (_Phase.IDLE, _Obs.UNKNOWN): (_Phase.IDLE, False, Decision.NONE),
    (_Phase.WARNED, _Obs.BUSY): (_Phase.WARNED, False, Decision.NONE),  # PAUSE once warn_seconds passed
    (_Phase.WARNED, _Obs.CLEAR): (_Phase.IDLE, False, Decision.NONE),  # the burst ended in time
    (_Phase.WARNED, _Obs.UNKNOWN): (_Phase.IDLE, False, Decision.NONE),  # never pause on unknown
    (_Phase.KEPT, _Obs.BUSY): (_Phase.KEPT, False, Decision.NONE),
    (_Phase.KEPT, _Obs.CLEAR): (_Phase.KEPT_CLEARING, True, Decision.NONE),
    (_Phase.KEPT, _Obs.UNKNOWN): (_Phase.KEPT, False, Decision.NONE),
    (_Phase.KEPT_CLEARING, _Obs.BUSY): (_Phase.KEPT, False, Decision.NONE),  # same episode goes on
    (_Phase.KEPT_CLEARING, _Obs.CLEAR): (_Phase.KEPT_CLEARING, False, Decision.NONE),  # IDLE after clear_seconds
    (_Phase.KEPT_CLEARING, _Obs.UNKNOWN): (_Phase.KEPT, False, Decision.NONE),
    (_Phase.PAUSED, _Obs.BUSY): (_Phase.PAUSED, False, Decision.NONE),
    (_Phase.PAUSED, _Obs.CLEAR): (_Phase.CLEARING, True, Decision.NONE),
    (_Phase.PAUSED, _Obs.UNKNOWN): (_Phase.PAUSED, False, Decision.NONE),  # unknown is not clear
    (_Phase.CLEARING, _Obs.BUSY): (_Phase.PAUSED, False, Decision.NONE),  # hysteresis: start over
    (_Phase.CLEARING, _Obs.CLEAR): (_Phase.CLEARING, False, Decision.NONE),  # RESUME after clear_seconds
    (_Phase.CLEARING, _Obs.UNKNOWN): (_Phase.PAUSED, False, Decision.NONE),
}

# phase whose timer ran out -> (next phase, decision)
_TIMER: dict[_Phase, tuple[_Phase, Decision]] = {
    _Phase.WARNED: (_Phase.PAUSED, Decision.PAUSE),
    _Phase.CLEARING: (_Phase.IDLE, Decision.RESUME),
    _Phase.KEPT_CLEARING: (_Phase.IDLE, Decision.NONE),
}


class AutoPause:
    def __init__(self, threshold_util: float = 60, warn_seconds: float = 60, clear_seconds: float = 180) -> None:
        self.threshold_util = threshold_util  # percent
        self.warn_seconds = warn_seconds  # seconds from WARN to PAUSE
        self.clear_seconds = clear_seconds  # seconds clear before RESUME (hysteresis)
        self._phase = _Phase.IDLE
        self._since = 0.0  # monotonic seconds: start of the current timer

    @property
    def paused(self) -> bool:
        """True while this policy holds sharing paused."""
        return self._phase in (_Phase.PAUSED, _Phase.CLEARING)

    @property
    def warning(self) -> bool:
        """True between WARN and PAUSE (the app shows "Keep sharing")."""
        return self._phase is _Phase.WARNED

    def busy(self, load: GpuLoad) -> bool:
        if load.fullscreen:
            return True
        return load.foreign_processes > 0 and load.utilization is not None and load.utilization >= self.threshold_util

    def update(self, load: GpuLoad | None, now: float) -> Decision:
        obs = _Obs.UNKNOWN if load is None else _Obs.BUSY if self.busy(load) else _Obs.CLEAR
        phase, restart, decision = _NEXT[(self._phase, obs)]
        if restart:
            self._since = now
        self._phase = phase
        limit = self.warn_seconds if phase is _Phase.WARNED else self.clear_seconds
        if phase in _TIMER and not restart and now - self._since >= limit:
            self._phase, decision = _TIMER[phase]
        if decision is not Decision.NONE:
            log.info("auto-pause: %s (load %s)", decision.value, load)
        return decision

    def keep_sharing(self, now: float) -> None:
        """The user chose "Keep sharing": no pause for the current busy episode."""
        if self._phase in (_Phase.WARNED, _Phase.IDLE, _Phase.KEPT_CLEARING) or self.paused:
            self._phase, self._since = _Phase.KEPT, now

    def reset(self) -> None:
        """Forget the current episode (the user paused, resumed or stopped by hand)."""
        self._phase, self._since = _Phase.IDLE, 0.0


# ---------------------------------------------------------------------- probes
def probe_gpu_load(own_pids: set[int]) -> GpuLoad | None:
    """The GPUs' load as NVML reports it, or None if it cannot be known (never raises)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no GPU: the load is unknown, but a fullscreen app is a fact
        return _fullscreen_only()
    try:
        util: float | None = None
        foreign: dict[int, int] = {}  # pid -> bytes
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            u = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            util = u if util is None else max(util, u)
            for getter in (pynvml.nvmlDeviceGetGraphicsRunningProcesses, pynvml.nvmlDeviceGetComputeRunningProcesses):
                try:
                    procs = getter(h)
                except pynvml.NVMLError_NotSupported:  # type: ignore[attr-defined]  # pynvml makes these at import
                    continue
                for p in procs:
                    if p.pid in own_pids:
                        continue
                    used = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else 0  # None under WDDM
                    foreign[p.pid] = foreign.get(p.pid, 0) + max(0, used)
        if util is None:  # no GPU at all
            return _fullscreen_only()
        return GpuLoad(
            utilization=util,
            foreign_processes=len(foreign),
            foreign_memory=sum(foreign.values()),
            fullscreen=fullscreen_app_running(),
        )
    except Exception as e:
        log.debug("NVML load unknown: %s", e)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _fullscreen_only() -> GpuLoad | None:
    """Without NVML: a known fullscreen app is still busy; otherwise the load is unknown (None)."""
    try:
        full = fullscreen_app_running()
    except Exception as e:
        log.debug("fullscreen state unknown: %s", e)
        return None
    return GpuLoad(utilization=None, foreign_processes=0, foreign_memory=0, fullscreen=True) if full else None


def fullscreen_app_running() -> bool:
    """A fullscreen D3D game, a presentation or a "busy" fullscreen app runs (Windows only; False elsewhere)."""
    if not sys.platform.startswith("win"):
        return False
    from ._windows_fullscreen import fullscreen_app_running as query

    return query()
