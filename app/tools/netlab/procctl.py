"""Hard process control for fault injection: kill a process at once, freeze it, thaw it.

Contract
--------
Three functions, each taking a process id and returning once the operating system accepted
the request (they do not wait for the effect; the caller waits, bounded, for what it needs):

* :func:`kill_hard` ends the process at once, with no chance to clean up: no ``finally``, no
  goodbye on its sockets beyond what the kernel does when a process dies (it closes them).
  POSIX: ``SIGKILL`` (``kill -9``).  Windows: ``TerminateProcess`` (exit code 1).
* :func:`freeze` stops every thread of the process where it stands, as a laptop whose lid
  closes or a debugger break: it computes nothing, answers nothing, but its sockets stay open
  and the kernel keeps accepting bytes for it until its buffers fill.  POSIX: ``SIGSTOP``.
  Windows: ``NtSuspendProcess`` (undocumented ntdll entry point, stable since XP).
* :func:`thaw` undoes :func:`freeze`: the process runs on from where it stood and finds
  whatever happened to its connections meanwhile.  POSIX: ``SIGCONT``.  Windows:
  ``NtResumeProcess``.

A process that no longer exists raises :class:`ProcessLookupError` on every OS.  The Windows
paths are isolated in ``_windows_*`` functions (ctypes only, defined on Windows only); they are
not exercised by the tests, which run on Linux, but pyright checks them for Windows.  This
module is for tests and ``molink chaos``: the app stops its children through the control
channel (:mod:`worker_core.control`), never through these.
"""

from __future__ import annotations

import os
import signal
import sys

# Windows access rights (winnt.h)
_PROCESS_TERMINATE = 0x0001
_PROCESS_SUSPEND_RESUME = 0x0800
_ERROR_INVALID_PARAMETER = 87  # OpenProcess on a pid that does not exist


def kill_hard(pid: int) -> None:
    """End ``pid`` at once, with no clean-up in the process (SIGKILL / TerminateProcess)."""
    if sys.platform == "win32":
        _windows_terminate(pid)
    else:
        os.kill(pid, signal.SIGKILL)


def freeze(pid: int) -> None:
    """Stop every thread of ``pid`` where it stands; sockets stay open (SIGSTOP / NtSuspendProcess)."""
    if sys.platform == "win32":
        _windows_suspend(pid, resume=False)
    else:
        os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    """Let a frozen ``pid`` run on from where it stood (SIGCONT / NtResumeProcess)."""
    if sys.platform == "win32":
        _windows_suspend(pid, resume=True)
    else:
        os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------------- Windows (untested here)
# Defined on Windows only: pyright checks them with the Windows platform (make lint), where ctypes has
# WinDLL, get_last_error and WinError; on POSIX the block is unreachable and the signals are used.

if sys.platform == "win32":
    import ctypes

    def _windows_open(pid: int, access: int) -> int:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p
        handle = kernel32.OpenProcess(access, False, pid)
        if not handle:
            err = ctypes.get_last_error()
            if err == _ERROR_INVALID_PARAMETER:
                raise ProcessLookupError(f"no process {pid}")
            raise ctypes.WinError(err)
        return handle

    def _windows_close(handle: int) -> None:
        ctypes.WinDLL("kernel32").CloseHandle(ctypes.c_void_p(handle))

    def _windows_terminate(pid: int) -> None:
        handle = _windows_open(pid, _PROCESS_TERMINATE)
        try:
            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
            if not kernel32.TerminateProcess(ctypes.c_void_p(handle), 1):
                raise ctypes.WinError(ctypes.get_last_error())
        finally:
            _windows_close(handle)

    def _windows_suspend(pid: int, resume: bool) -> None:
        handle = _windows_open(pid, _PROCESS_SUSPEND_RESUME)
        try:
            ntdll = ctypes.WinDLL("ntdll")
            call = ntdll.NtResumeProcess if resume else ntdll.NtSuspendProcess
            call.restype = ctypes.c_long  # NTSTATUS
            status = call(ctypes.c_void_p(handle))
            if status < 0:
                name = "NtResumeProcess" if resume else "NtSuspendProcess"
                raise OSError(f"{name} failed: NTSTATUS {status & 0xFFFFFFFF:#010x}")
        finally:
            _windows_close(handle)
