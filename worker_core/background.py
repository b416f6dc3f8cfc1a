"""The executor a standby member computes on: one thread at the lowest CPU priority.

Contract
--------
``background_executor()`` returns this process's one such executor (made on first use, never
shut down: its thread is a daemon of the process).  Its thread lowers its own scheduling
priority when it starts: on Linux and macOS its nice value goes to 19 (a thread's own, not the
process's: the stage executor keeps its priority, and a standby member that later serves a
stage needs no privilege to compute at full speed again); on Windows it asks for
``THREAD_PRIORITY_IDLE``.  Where that is refused it runs at normal priority and says so once in
the log.  What runs there is work nobody waits for: a standby member keeping a copy of the open
requests' caches (:mod:`master_core.shadow`), which on a machine shared with stages must take
only the CPU they leave idle.  torch's own intra-op threads (more than one torch thread) are not
lowered.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def lower_priority() -> None:
    """Lower the calling thread's CPU priority as far as it goes (see the module docstring)."""
    try:
        if sys.platform == "win32":  # not run on this project's machines (no Windows here)
            import ctypes

            kernel = ctypes.windll.kernel32  # type: ignore[attr-defined]
            if not kernel.SetThreadPriority(kernel.GetCurrentThread(), -15):  # THREAD_PRIORITY_IDLE
                raise OSError("SetThreadPriority failed")
        else:  # a Linux thread id is a process id to setpriority: only this thread changes
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError) as e:
        log.warning("background work runs at normal priority: %s", e)


def background_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="molink-standby", initializer=lower_priority)
        return _executor
