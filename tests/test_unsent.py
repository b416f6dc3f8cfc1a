"""A link's kernel keeps few bytes unsent (worker_core.unsent), so the outbox's order holds."""

import fcntl
import socket
import struct
import sys

import pytest

from worker_core.unsent import UNSENT_BYTES, keep_unsent_low

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQNSD (unsent bytes) is Linux's")

SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes a TCP socket holds not sent yet


class Transport:
    """What keep_unsent_low reads of an asyncio transport or an aiohttp WebSocket."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None


def fill(low: bool) -> tuple[int, int]:
    """Write to a peer that reads nothing (its buffer small: a slow link's window) until the kernel
    refuses: (bytes it took, bytes it holds unsent)."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()) as c, srv.accept()[0]:
            if low:
                assert keep_unsent_low(Transport(c))
            c.setblocking(False)
            took, piece = 0, b"x" * (16 * 1024)
            try:
                while took < 64 << 20:
                    took += c.send(piece)
            except BlockingIOError:
                pass
            unsent = struct.unpack("i", fcntl.ioctl(c.fileno(), SIOCOUTQNSD, b"\0" * 4))[0]
            return took, unsent


def test_the_kernel_holds_a_few_pieces_unsent_not_megabytes():
    took, unsent = fill(low=True)
    # the kernel takes a write while under the mark, and fills its last segment buffer: 54 kB seen
    assert unsent <= UNSENT_BYTES + 2 * 16 * 1024, (took, unsent)
    # without it, the kernel grows its buffer and takes megabytes a decode frame would wait behind
    took_default, unsent_default = fill(low=False)
    assert unsent_default > 8 * UNSENT_BYTES, (took_default, unsent_default)
    assert took_default > 4 * took


def test_nothing_to_set_without_a_tcp_socket():
    assert not keep_unsent_low(None)
    assert not keep_unsent_low(Transport(None))
    a, b = socket.socketpair()
    with a, b:
        assert not keep_unsent_low(Transport(a))  # a unix socket has no TCP options
