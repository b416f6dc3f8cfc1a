"""The dialer's side of a relay: a byte stream to a master (or any registered listener) through it.

Contract
--------
``await open_bridged(relay, group=FP)`` (or ``nameplate=NN``, the first two digits of a pairing
code) connects to the relay at ``relay`` (``HOST:PORT``), asks for the group and returns
``(reader, writer)`` once the master dialled back: the next bytes are the master's, and the
caller runs its pinned TLS over them exactly as over a direct connection.  A refusal raises
:class:`BridgeRefused` (a ``ConnectionError``: callers that retry unreachable masters retry it)
with the relay's code and line; no answer within ``timeout`` raises ``asyncio.TimeoutError``.

``BridgeForwarder(relay, group=..., nameplate=...)`` is the way that leaves the clients
unchanged: ``await start()`` listens on 127.0.0.1 (``address`` is ``127.0.0.1:PORT``), and
each local connection is joined to a fresh :func:`open_bridged` stream (half-close passed
on); a refused or failed relay dial closes the local connection (the client sees its dial
fail) and is kept in ``last_error``.  The tunnel dial, the probe and the pairing dial all go
through it: TLS server name and pinning do not depend on the host dialled.
``stop()`` closes the listener and every joined connection.

``await open_bridged_tls(relay, ssl, server_hostname, group=..., nameplate=...)`` is the same
dial with a TLS client handshake run over the splice (the preamble is read straight off the
socket, never past its frame, so the TLS starts at the master's first byte): what a racing
dialer (:func:`worker_core.worker.pick_path`, the pairing race of :mod:`app.group.client`)
needs to check the master's pin through the relay.  A tunnel whose race the relay won then goes
through a :class:`BridgeForwarder`.  Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from .bridge_wire import BridgeError, Dial, Error, Ok, encode, read_frame, sock_reader, split_address
from .tasks import end_tasks

log = logging.getLogger("molink.bridge")

CHUNK = 64 * 1024
DIAL_TIMEOUT = 20.0  # seconds for the relay to connect us (it waits up to 10 s for the master)


class BridgeRefused(ConnectionError):
    """The relay refused the dial; ``code`` is its reason's code (``unknown_group``, ``busy``, ...)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"the relay refused: {reason} ({code})")
        self.code = code


async def open_bridged(
    relay: str, group: str = "", nameplate: str = "", timeout: float = DIAL_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = split_address(relay)

    async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, port, limit=CHUNK)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(encode(Dial(group=group, nameplate=nameplate)))
            await writer.drain()
            await _answered(reader.readexactly)
            return reader, writer
        except BaseException:
            writer.close()
            raise

    return await asyncio.wait_for(dial(), timeout)


async def _answered(recv_exactly: Callable[[int], Awaitable[bytes]]) -> None:
    """The relay's answer to a dial: returns on ``Ok``, else :class:`BridgeRefused`."""
    try:
        answer = await read_frame(recv_exactly)
    except BridgeError as e:
        raise BridgeRefused(e.code, f"unreadable answer: {e}") from None
    if isinstance(answer, Error):
        raise BridgeRefused(answer.code, answer.reason)
    if not isinstance(answer, Ok):
        raise BridgeRefused("malformed", f"expected ok, got {type(answer).__name__.lower()}")


async def open_bridged_tls(
    relay: str,
    tls: ssl.SSLContext,
    server_hostname: str,
    group: str = "",
    nameplate: str = "",
    timeout: float = DIAL_TIMEOUT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = split_address(relay)
    loop = asyncio.get_running_loop()

    async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        family, kind, proto, _name, address = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, encode(Dial(group=group, nameplate=nameplate)))
            await _answered(sock_reader(sock))
            return await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=server_hostname, limit=CHUNK)
        except BaseException:
            sock.close()
            raise

    return await asyncio.wait_for(dial(), timeout)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()


class BridgeForwarder:
    def __init__(self, relay: str, group: str = "", nameplate: str = "") -> None:
        split_address(relay)  # a bad address fails here, not at the first dial
        self.relay, self.group, self.nameplate = relay, group, nameplate
        self.port = 0
        self.last_error = ""
        self.joined = 0  # connections joined through the relay
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._join, "127.0.0.1", 0, limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await end_tasks(list(self._tasks))  # cancelled until they end, bounded (5 s)

    async def __aenter__(self) -> BridgeForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _join(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        far: asyncio.StreamWriter | None = None
        try:
            try:
                far_reader, far = await open_bridged(self.relay, self.group, self.nameplate)
            except (OSError, asyncio.TimeoutError) as e:
                self.last_error = str(e) or type(e).__name__
                log.warning("through relay %s: %s", self.relay, self.last_error)
                return
            self.joined += 1
            await asyncio.gather(_pump(reader, far), _pump(far_reader, writer))
        except asyncio.CancelledError:
            pass  # stop(): this handler's task is the forwarder's own, and it ends here (Python 3.11's
            # asyncio.streams reports a cancelled connection handler as an unhandled exception)
        finally:
            if far is not None:
                far.close()
            writer.close()
            self._tasks.discard(task)
