"""A loopback TCP proxy whose link can be cut: emulates a worker losing its connection.

Contract
--------
``TcpProxy(target_host, target_port)`` listens on ``listen_host`` (``127.0.0.1``, or another
loopback address), at a port chosen at :meth:`TcpProxy.start` or the one given, and joins
every accepted connection to a new connection to the target, copying bytes both ways until
either side closes.  It is put between a worker and the master so that a test can cut that
worker's tunnel without touching either process:

* :meth:`cut` ends every current connection at once.  ``CutMode.RST`` (default) aborts both
  sockets with a TCP reset, as a NAT box or a crashed router would; ``CutMode.CLOSE`` closes
  them in order (FIN), as a peer that hangs up.  Both ends see the end of the connection at
  once.
* :meth:`blackhole` keeps every current connection open but silently drops the bytes of both
  directions from then on (a Wi-Fi link that died without a word: neither end is told; only
  a heartbeat can notice).  Such connections stay useless until :meth:`cut` or :meth:`close`.
* :meth:`refuse` makes the proxy reset every new connection at once (the link is still down);
  :meth:`accept` lets new connections through again (the link is back).

Bounds: at most ``max_connections`` open at once (more are reset), a connect to the target
within ``connect_timeout`` seconds, reads of at most ``CHUNK`` bytes with write back-pressure
(``drain``), so memory per connection is bounded.  :meth:`close` stops listening, aborts
every connection and waits (bounded) for its tasks; ``async with`` does both ends.  Counters:
``accepted``, ``refused``, ``cuts``, ``bytes_up`` (client to target) and ``bytes_down``.
Knows nothing of WebSockets or of MoLink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from enum import Enum

log = logging.getLogger("molink.proxy")

CHUNK = 64 * 1024  # bytes read at once from either side
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the pumps to end


class CutMode(Enum):
    RST = "rst"  # abort with a TCP reset (SO_LINGER 0)
    CLOSE = "close"  # orderly close (FIN)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection of ``writer`` with a TCP reset rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        linger = struct.pack("HH", 1, 0) if sys.platform == "win32" else struct.pack("ii", 1, 0)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    writer.transport.abort()


class _Pair:
    """One proxied connection: the client side, the target side, and the two pumps."""

    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.client = client
        self.target = target
        self.dropping = False  # blackholed: read and discard
        self.tasks: list[asyncio.Task] = []

    def end(self, mode: CutMode) -> None:
        for w in (self.client, self.target):
            if mode is CutMode.RST:
                _reset(w)
            else:
                w.close()
        for t in self.tasks:
            t.cancel()


class TcpProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_port: int = 0,
        listen_host: str = "127.0.0.1",
        max_connections: int = 64,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_port = listen_port
        self.listen_host = listen_host  # a loopback address (127.0.0.0/8)
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout  # seconds
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[_Pair] = set()
        self._handlers: set[asyncio.Task] = set()
        self._refusing = False
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        """Listen on ``listen_host`` (loopback); returns the port."""
        self._server = await asyncio.start_server(self._on_client, self.listen_host, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def connections(self) -> int:
        return len(self._pairs)

    async def close(self) -> None:
        """Stop listening, abort every connection, wait (bounded) for the pumps."""
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            pair.end(CutMode.RST)
        tasks = [t for p in self._pairs for t in p.tasks] + list(self._handlers)
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        self._pairs.clear()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ faults
    def cut(self, mode: CutMode = CutMode.RST) -> int:
        """End every current connection now; returns how many were cut."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.end(mode)
        self._pairs.clear()
        self.cuts += len(pairs)
        if pairs:
            log.info("proxy %s: cut %d connection(s) (%s)", self.address, len(pairs), mode.value)
        return len(pairs)

    def blackhole(self) -> int:
        """Keep current connections open but drop their bytes both ways; returns how many."""
        for pair in self._pairs:
            pair.dropping = True
        return len(self._pairs)

    def refuse(self) -> None:
        """Reset every new connection at once until :meth:`accept`."""
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    # ------------------------------------------------------------------ forwarding
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or len(self._pairs) >= self.max_connections:
            self.refused += 1
            _reset(writer)
            return
        try:
            t_reader, t_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as e:
            log.info("proxy %s: target unreachable: %s", self.address, e or type(e).__name__)
            self.refused += 1
            _reset(writer)
            return
        if self._refusing:  # refused while connecting
            self.refused += 1
            _reset(writer)
            _reset(t_writer)
            return
        self.accepted += 1
        pair = _Pair(writer, t_writer)
        self._pairs.add(pair)
        up = asyncio.create_task(self._pump(pair, reader, t_writer, up=True))
        down = asyncio.create_task(self._pump(pair, t_reader, writer, up=False))
        pair.tasks = [up, down]
        try:
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._pairs.discard(pair)
            for w in (writer, t_writer):
                if not w.is_closing():
                    w.close()

    async def _pump(self, pair: _Pair, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        """Copy ``src`` to ``dst`` until EOF (then half-close ``dst``) or an error (then abort both)."""
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                if pair.dropping:
                    continue
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                dst.write(data)
                await dst.drain()
            if not pair.dropping and dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
        except (ConnectionError, OSError):
            for w in (pair.client, pair.target):
                w.transport.abort()
