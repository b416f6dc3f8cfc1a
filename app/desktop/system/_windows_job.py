"""Windows only: a Job Object that ends the engine children when the tray process dies.

Contract: ``ChildJob(kernel32=None)``; ``add(pid)`` puts a running child into one job created
with ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``: when the tray exits or crashes, Windows closes the
job handle and ends every child still in it, so a GPU is never left busy by an orphan (the
control channel's closed stdin already stops a healthy child; this is the backstop for a hung
one).  Returns False, and logs, where the job cannot be made or the process not added; never
raises.  Elsewhere (``sys.platform != "win32"``) :func:`child_job` returns None.  Not run on
Windows by the tests here: they drive it with a fake ``kernel32``.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

log = logging.getLogger("molink.app.job")

JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
PROCESS_SET_QUOTA = 0x0100
PROCESS_TERMINATE = 0x0001


class _BasicLimits(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", ctypes.c_uint32),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", ctypes.c_uint32),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", ctypes.c_uint32),
        ("SchedulingClass", ctypes.c_uint32),
    ]


class _IoCounters(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "ReadOperationCount",
            "WriteOperationCount",
            "OtherOperationCount",
            "ReadTransferCount",
            "WriteTransferCount",
            "OtherTransferCount",
        )
    ]


class _ExtendedLimits(ctypes.Structure):
    _fields_ = [
        ("BasicLimitInformation", _BasicLimits),
        ("IoInfo", _IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


def _kernel32() -> Any:
    if sys.platform != "win32":
        raise OSError("job objects are Windows only")
    return ctypes.windll.kernel32


class ChildJob:
    def __init__(self, kernel32: Any = None) -> None:
        self.k32 = kernel32 if kernel32 is not None else _kernel32()
        self.handle = self.k32.CreateJobObjectW(None, None)
        if not self.handle:
            log.warning("cannot create a job object for the engine processes")
            return
        info = _ExtendedLimits()
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        ok = self.k32.SetInformationJobObject(
            self.handle, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info), ctypes.sizeof(info)
        )
        if not ok:
            log.warning("cannot set kill-on-close on the engine job object")
            self.handle = None

    def add(self, pid: int) -> bool:
        if not self.handle:
            return False
        process = self.k32.OpenProcess(PROCESS_SET_QUOTA | PROCESS_TERMINATE, False, pid)
        if not process:
            log.warning("cannot open engine process %d to add it to the job", pid)
            return False
        try:
            ok = bool(self.k32.AssignProcessToJobObject(self.handle, process))
        finally:
            self.k32.CloseHandle(process)
        if not ok:
            log.warning("cannot add engine process %d to the job", pid)
        return ok


def child_job() -> ChildJob | None:
    """The job for this tray's children on Windows, else None."""
    if sys.platform != "win32":
        return None
    try:
        return ChildJob()
    except (OSError, AttributeError) as e:
        log.warning("no job object for the engine processes: %s", e)
        return None
