"""A Windows socket's TCP counters: ``WSAIoctl(SIO_TCP_INFO)`` with version 0 in, a
``TCP_INFO_v0`` out (mstcpip.h; Windows 10 1703 and later).  Used by :mod:`worker_core.tcp_info`.

``read(sock)`` -> (bytes in flight, bytes acknowledged, min round trip in seconds, bytes sent
once), or None when the call fails (an older Windows, a closed socket).  ``from_v0`` is the pure part (any OS).
Not run on Windows in this project's CI (no Windows machine): its layout is checked against the
documented one in tests/test_inflight.py, and any failure of the call reads as "not told".
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

SIO_TCP_INFO = 0xD8000027  # _WSAIORW(IOC_VENDOR, 39)


class TcpInfoV0(ctypes.Structure):
    """``TCP_INFO_v0`` (natural alignment: 88 bytes on x64)."""

    _fields_ = [
        ("State", ctypes.c_uint32),
        ("Mss", ctypes.c_uint32),
        ("ConnectionTimeMs", ctypes.c_uint64),
        ("TimestampsEnabled", ctypes.c_uint8),
        ("RttUs", ctypes.c_uint32),
        ("MinRttUs", ctypes.c_uint32),
        ("BytesInFlight", ctypes.c_uint32),
        ("Cwnd", ctypes.c_uint32),
        ("SndWnd", ctypes.c_uint32),
        ("RcvWnd", ctypes.c_uint32),
        ("RcvBuf", ctypes.c_uint32),
        ("BytesOut", ctypes.c_uint64),
        ("BytesIn", ctypes.c_uint64),
        ("BytesReordered", ctypes.c_uint32),
        ("BytesRetrans", ctypes.c_uint32),
        ("FastRetrans", ctypes.c_uint32),
        ("DupAcksIn", ctypes.c_uint32),
        ("TimeoutEpisodes", ctypes.c_uint32),
        ("SynRetrans", ctypes.c_uint8),
    ]


def from_v0(info: TcpInfoV0) -> tuple[int, int, float, int]:
    """(in flight, acknowledged, min round trip s, sent once) of a ``TCP_INFO_v0``: sent once is
    bytes out less bytes sent again; acknowledged, what of it is no longer in flight."""
    flight, sent = info.BytesInFlight, max(0, info.BytesOut - info.BytesRetrans)
    return flight, max(0, sent - flight), info.MinRttUs / 1e6, sent


@functools.cache
def _wsaioctl() -> Any:
    if sys.platform != "win32":
        raise OSError("SIO_TCP_INFO is Windows'")
    ws2 = ctypes.WinDLL("ws2_32", use_last_error=True)
    f = ws2.WSAIoctl
    f.argtypes = [
        ctypes.c_size_t,  # SOCKET (UINT_PTR)
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_void_p,  # no OVERLAPPED: the query completes at once
        ctypes.c_void_p,
    ]
    f.restype = ctypes.c_int
    return f


def read(sock: Any) -> tuple[int, int, float, int] | None:
    """``sock``'s counters (see the module docstring), or None."""
    try:
        handle = sock.fileno()
        if handle < 0:
            return None
        version, out, got = ctypes.c_uint32(0), TcpInfoV0(), ctypes.c_uint32(0)
        rc = _wsaioctl()(
            handle,
            SIO_TCP_INFO,
            ctypes.byref(version),
            ctypes.sizeof(version),
            ctypes.byref(out),
            ctypes.sizeof(out),
            ctypes.byref(got),
            None,
            None,
        )
    except (OSError, AttributeError, ValueError):
        return None
    if rc != 0 or got.value < TcpInfoV0.SynRetrans.offset:  # every field read comes before it
        return None
    return from_v0(out)
