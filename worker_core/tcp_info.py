"""What the kernel knows of one TCP connection's sending side, on Linux and on Windows.

Contract
--------
``read(sock)`` returns a :class:`TcpCounters` for a connected TCP socket ``sock`` (``AF_INET`` or
``AF_INET6``; anything with ``family``, ``fileno`` and ``getsockopt``, as an asyncio transport's
``get_extra_info("socket")``), or None where the OS does not say (macOS, an older kernel, a closed
or non-TCP socket).  ``readable(sock)``: whether this OS has a reader and ``sock`` is TCP.

* Linux: ``getsockopt(TCP_INFO)`` (kernel 4.19+ for the byte counts); every field is known.
* Windows 10 1703+: ``WSAIoctl(SIO_TCP_INFO)``, :mod:`worker_core.tcp_info_windows`.  It has no
  count of the bytes the stack holds unsent (``unsent`` None): a sender that needs it counts the
  bytes it handed the socket and compares them with ``sent`` (:mod:`worker_core.inflight`).  Its
  acknowledged bytes are derived: bytes sent once, less those in flight.
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

_INFO_BYTES = 232  # struct tcp_info up to tcpi_bytes_retrans (Linux 4.19+)
# offsets in struct tcp_info (include/uapi/linux/tcp.h)
_MIN_RTT, _NOTSENT, _ACKED, _SENT, _RETRANS = 148, 144, 120, 200, 208


@dataclass(frozen=True)
class TcpCounters:
    flight: int  # bytes sent and not yet acknowledged
    unsent: int | None  # bytes the kernel holds not yet sent (None: the OS does not say)
    acked: int  # bytes acknowledged since the connection began
    min_rtt: float  # the lowest round trip measured, seconds (0.0: none yet)
    sent: int  # bytes sent since the connection began, each once (retransmissions not counted again)


def readable(sock: Any) -> bool:
    """Is ``sock`` a TCP socket on an OS whose counters :func:`read` can read?"""
    os_ok = sys.platform.startswith("linux") or sys.platform == "win32"
    return os_ok and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)


def read(sock: Any) -> TcpCounters | None:
    """The counters of ``sock``'s connection now, or None (see the module docstring)."""
    if not readable(sock):
        return None
    if sys.platform == "win32":
        from . import tcp_info_windows

        got = tcp_info_windows.read(sock)
        if got is None:
            return None
        flight, acked, min_rtt, sent = got
        return TcpCounters(flight, None, acked, min_rtt, sent)
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO_BYTES)
    except OSError:  # closed, or not TCP after all
        return None
    if len(raw) < _INFO_BYTES:  # a kernel older than 4.19: no byte counts
        return None
    (notsent,) = struct.unpack_from("I", raw, _NOTSENT)
    (min_rtt,) = struct.unpack_from("I", raw, _MIN_RTT)
    (acked,) = struct.unpack_from("Q", raw, _ACKED)
    sent, retrans = struct.unpack_from("QQ", raw, _SENT)
    return TcpCounters(max(0, sent - retrans - acked), notsent, acked, min_rtt / 1e6, sent - retrans)
