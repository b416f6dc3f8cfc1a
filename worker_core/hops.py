"""Direct stage-to-stage hops: a worker's hop listener and its dialled link to the next stage.

Contract
--------
A pipeline's activations normally cross the master twice per stage (the relay).  Where stage i
can reach stage i+1, the master tells both (wire ``Route``) and stage i sends its output
straight on, as a ``Step`` of the same id, over a WebSocket it dials to stage i+1's listener.

* :class:`HopListener` is one per worker process (its port outlives tunnels and epochs; the
  worker announces it in ``Hello.hop_port``).  :meth:`HopListener.accept` sets who may dial in
  for an epoch: the secret token (header ``X-MoLink-Hop``) and, in a paired group, the exact
  certificate the previous stage must present in the TLS 1.3 handshake (mutual TLS, pinned like
  every other link of the group: its trust store is that certificate alone).  A dial with a
  wrong token, a wrong or missing certificate, or for no epoch gets 403; connections of an
  earlier epoch are closed when a new one is accepted.  Every frame read is decoded with the
  session's bound and must be a ``Step`` of the accepted epoch, or the hop closes as a protocol
  error (the tunnel to the master is not affected).  Accepted steps go to ``sink``, the current
  session's in-order queue; with no session they are dropped.
* :func:`dial` opens the hop to the next stage (bounded by ``CONNECT_TIMEOUT``) and returns a
  :class:`NextHop`, or raises :class:`HopUnreachable` with the reason.  :meth:`NextHop.send`
  queues a step (never waiting for the link: :mod:`worker_core.outbox`, urgent ones, decode
  steps, before prefill still queued, one frame on the link at a time) through a
  :class:`~worker_core.shaper.LinkShaper` (the worker's emulated uplink: every pair of machines
  is ``delay`` apart one way); when the hop is down, or goes down before a queued step leaves,
  that step's ``fallback`` runs instead (the worker returns its output to
  the master, which relays it: nothing is lost).  Both ends ping every ``HEARTBEAT`` seconds, so
  a path that dies quietly (a NAT that forgot an idle mapping) goes down before a step is sent
  into it.  A hop that went down stays down for its epoch.
* Through a relay (paired groups): a worker whose group has a relay registers its hop listener
  there under its own certificate's fingerprint (:class:`~worker_core.bridge_host.BridgeHost`);
  each call the relay splices to it is served by :meth:`HopListener.accept_bridged` with the
  same TLS context, pinning and token check as a dial from anywhere.  :func:`dial` given a
  ``relay`` tries the direct address first (when there is one) and, when that fails, asks the
  relay for the next stage by the fingerprint of ``cert_pem`` (bounded by
  ``RELAYED_CONNECT_TIMEOUT``): the WebSocket runs through a local
  :class:`~worker_core.bridge_dial.BridgeForwarder` that the hop owns, the TLS end to end over
  the relay's splice; ``NextHop.through`` names the relay ("" for a direct hop).  Everything
  after the dial is the same hop: heartbeats, and the master's relaying when it goes down (a
  relay that stops closes the splice, and so the hop).  The worker keeps trying the direct
  address of a relayed hop (``DIRECT_RETRY``) and moves onto it once it opens and the relayed
  hop is quiet (:meth:`NextHop.quiet_for`, ``MOVE_QUIET``).
* In a plain (unpaired) group the listener and the dial are plain ``ws://`` with the token only:
  loopback tests and the local demo, like the plain tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import WSMsgType, web

from .bridge_dial import BridgeForwarder
from .identity import Identity, client_context, der_fingerprint, fingerprint, server_context
from .inflight import counted, gate, room_of
from .listen import bind, families
from .outbox import Outbox
from .pieces import Joiner, split_item
from .shaper import LinkShaper
from .unsent import keep_unsent_low
from .wire import UNASSIGNED_FRAME_BYTES, CloseCode, ProtocolError, Step, encode

log = logging.getLogger("molink.hops")

HOP_PATH = "/v1/hop"
TOKEN_HEADER = "X-MoLink-Hop"
CONNECT_TIMEOUT = 3.0  # seconds to open a hop (TCP, TLS, WebSocket); longer counts as unreachable
# seconds to open one through a relay: the relay calls the next stage, which dials it back first
RELAYED_CONNECT_TIMEOUT = 6.0
MAX_INBOUND = 4  # hop connections one listener keeps open at once
SEND_TIMEOUT = 30.0  # seconds one frame may take to leave on a hop before it counts as down
HEARTBEAT = 5.0  # seconds between the dialler's pings: a path that died quietly (a NAT forgot it) goes down
DIRECT_RETRY = 30.0  # seconds between tries of a relayed hop's direct address (a mapping may come later)
# seconds a relayed hop must have sent nothing before a direct one takes over: a hop's steps must
# arrive in order, and what left the relayed one is through the relay by then
MOVE_QUIET = 5.0


class HopUnreachable(Exception):
    """The next stage's hop listener cannot be reached or refused us."""


@dataclass(frozen=True)
class _Accept:
    epoch: int
    token: str
    fingerprint: str  # of the certificate the dialler must present ("" in a plain group)


class HopListener:
    def __init__(self, identity: Identity | None) -> None:
        self.identity = identity
        self.port = 0
        self.sink: Callable[[Step], None] | None = None  # the current session's queue
        self.max_frame: int = UNASSIGNED_FRAME_BYTES  # the serving range's bound on a step (set on Assign)
        self._accept: _Accept | None = None
        self._context: ssl.SSLContext | None = None  # paired: pinned to the accepted dialler
        self._base: ssl.SSLContext | None = None  # paired: every handshake's first context (it switches)
        self._runner: web.AppRunner | None = None
        self._open: dict[web.WebSocketResponse, int] = {}  # inbound hop -> its epoch
        self._closing: set[asyncio.Task] = set()  # closes of hops of an earlier epoch, awaited by stop()

    async def start(self, host: str, port: int = 0) -> None:
        app = web.Application(client_max_size=1024)
        app.add_routes([web.get(HOP_PATH, self._hop)])
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        base: ssl.SSLContext | None = None
        if self.identity is not None:
            base = server_context(self.identity, [], required=True)  # refuses all: each handshake switches
            base.sni_callback = self._switch
        self._base = base
        self.port = await bind(self._runner, families(host), port, base, "hop listener")
        how = "mutual TLS" if base else "plain, loopback only"
        log.info("hop listener on %s port %d (%s)", " and ".join(families(host)), self.port, how)

    async def stop(self) -> None:
        for ws in list(self._open):
            await ws.close(code=CloseCode.NORMAL, message=b"worker stopping")
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def accept_bridged(self, sock: socket.socket, label: str) -> None:
        """Serve ``sock`` (a relay's data connection, at the previous stage's first TLS byte) as a
        dial from anywhere: the same TLS contexts, certificate pin and token check."""
        if self._runner is None or self._runner.server is None or self._base is None:
            sock.close()
            return
        log.info("hop connection through the relay (%s)", label)
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(self._runner.server, sock, ssl=self._base)

    def _switch(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._context is not None:
            sslobj.context = self._context

    def accept(self, epoch: int, token: str, cert_pem: str) -> None:
        """From now on accept the dialler of ``epoch`` holding ``token`` (and, paired, the
        certificate ``cert_pem``); an empty token accepts nobody.  Older hops close."""
        if not token or (self.identity is not None and not cert_pem):
            self._accept, self._context = None, None
        else:
            fp = fingerprint(cert_pem) if self.identity is not None else ""
            self._accept = _Accept(epoch, token, fp)
            self._context = (
                server_context(self.identity, [cert_pem], required=True) if self.identity is not None else None
            )
        for ws, at in list(self._open.items()):
            if self._accept is None or at != self._accept.epoch:
                task = asyncio.ensure_future(ws.close(code=CloseCode.NORMAL, message=b"new pipeline"))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _allowed(self, request: web.Request) -> _Accept | None:
        acc = self._accept
        if acc is None or len(self._open) >= MAX_INBOUND:
            return None
        token = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(token.encode(), acc.token.encode()):
            return None
        if self.identity is not None:
            sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
            der = sslobj.getpeercert(binary_form=True) if sslobj else None
            if not der or not hmac.compare_digest(der_fingerprint(der), acc.fingerprint):
                return None
        return acc

    async def _hop(self, request: web.Request) -> web.StreamResponse:
        acc = self._allowed(request)
        if acc is None:
            log.warning("hop from %s refused: not the previous stage of the current pipeline", request.remote)
            raise web.HTTPForbidden(text="not the previous stage of this pipeline")
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, compress=False, heartbeat=HEARTBEAT)
        await ws.prepare(request)
        self._open[ws] = acc.epoch
        log.info("hop from %s open (epoch %d)", request.remote, acc.epoch)
        joiner = Joiner()  # longer steps come in pieces (worker_core.pieces)
        try:
            async for frame in ws:
                if frame.type is not WSMsgType.BINARY:
                    raise ProtocolError(f"unexpected {frame.type.name} frame on a hop")
                if (msg := joiner.feed(frame.data, self.max_frame)) is None:
                    continue
                if not isinstance(msg, Step) or msg.epoch != acc.epoch:
                    raise ProtocolError(f"a hop carries steps of epoch {acc.epoch} only, got {type(msg).__name__}")
                if self.sink is not None:
                    self.sink(msg)
        except ProtocolError as e:
            log.error("hop from %s sent a bad frame, closing it: %s", request.remote, e)
            await ws.close(code=CloseCode.PROTOCOL_ERROR, message=b"protocol error")
        finally:
            self._open.pop(ws, None)
        return ws


class NextHop:
    """An open hop to the next stage (see the module docstring)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse[bool],
        epoch: int,
        delay: float,
        rate: float | None,
    ) -> None:
        self.epoch = epoch
        self.through = ""  # the relay this hop crosses ("" direct)
        self.forwarder: BridgeForwarder | None = None  # the local end of a relayed hop, stopped on close
        self._http, self._ws = http, ws
        self._fallbacks: deque[Callable[[], Awaitable[None]]] = deque()
        self._shaper = LinkShaper(delay, rate, self._deliver)
        self._gate = gate(ws)
        self._out = counted(lambda data: self._ws.send_bytes(data), self._gate)  # every frame, told to the gate
        self._outbox: Outbox[tuple[bytes, Callable[[], Awaitable[None]]]] = Outbox(
            self._ship, _in_pieces, room_of(self._gate)
        )
        self.down: str | None = None  # why the hop is down, or None while it is up
        self._last_sent = time.monotonic()  # when the last frame left (or the hop opened)
        self._reader = asyncio.ensure_future(self._read())

    def quiet_for(self) -> float:
        """Seconds since the last frame left; 0 while a step is queued or on its way out."""
        if self._outbox.backlog or self._fallbacks:
            return 0.0
        return time.monotonic() - self._last_sent

    async def _read(self) -> None:
        """A hop carries nothing back: read only to notice that it closed."""
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
            async for _ in self._ws:
                pass
        self._went_down("closed by the next stage")

    def _went_down(self, why: str, closing: bool = False) -> None:
        if self.down is None:
            self.down = why
            if not closing:
                log.warning("direct hop to the next stage is down (%s): relaying through the master", why)

    async def send(self, step: Step, fallback: Callable[[], Awaitable[None]], urgent: bool = False) -> None:
        """Send ``step`` on (``urgent``: before every step queued without urgency); if it cannot
        leave (hop down now or before its turn), run ``fallback`` instead."""
        if self.down is not None:
            await fallback()
            return
        self._outbox.put((encode(step), fallback), urgent)

    async def _ship(self, item: tuple[bytes, Callable[[], Awaitable[None]]]) -> None:
        frame, fallback = item
        if self.down is not None:
            await fallback()
            return
        self._fallbacks.append(fallback)
        await self._shaper.put(frame)
        await self._shaper.drained()

    async def _deliver(self, frame: bytes) -> None:
        fallback = self._fallbacks.popleft()
        if self.down is None:
            try:
                await asyncio.wait_for(self._out(frame), SEND_TIMEOUT)
                self._last_sent = time.monotonic()
                return
            except (ConnectionError, RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                self._went_down(f"send failed: {e or type(e).__name__}")
        await fallback()

    async def close(self) -> None:
        self._went_down("closed", closing=True)
        queued = await self._outbox.close()
        self._shaper.close()
        self._fallbacks.extend(fallback for _, fallback in queued)
        while self._fallbacks:  # steps still waiting on the emulated link go through the master
            await self._fallbacks.popleft()()
        self._reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), 2.0)
        await self._http.close()
        if self.forwarder is not None:
            await self.forwarder.stop()


async def dial(
    address: str,
    epoch: int,
    token: str,
    cert_pem: str,
    identity: Identity | None,
    delay: float = 0.0,
    rate: float | None = None,
    relay: str = "",
) -> tuple[NextHop, float]:
    """Open the hop to the next stage at ``address`` ("host:port", "" for none), else through
    ``relay`` ("host:port", "" for none; paired groups only): (the hop, seconds the handshake
    took).  Paired (``identity`` given): TLS 1.3 with this machine's certificate, accepting only
    ``cert_pem``.  HopUnreachable, saying why each way failed, when neither opens within its
    bound (``CONNECT_TIMEOUT``, then ``RELAYED_CONNECT_TIMEOUT``)."""
    if identity is not None and not cert_pem:
        raise HopUnreachable("no certificate to pin the next stage to")
    why = []
    if address:
        try:
            return await _open(address, epoch, token, cert_pem, identity, delay, rate, CONNECT_TIMEOUT)
        except HopUnreachable as e:
            if not relay or identity is None:
                raise
            why.append(str(e))
            log.info("next stage not reachable directly (%s): dialling it through relay %s", e, relay)
    if not relay or identity is None:
        raise HopUnreachable("no address and no relay to reach the next stage by")
    forwarder = BridgeForwarder(relay, group=fingerprint(cert_pem))
    await forwarder.start()
    try:
        hop, seconds = await _open(
            forwarder.address, epoch, token, cert_pem, identity, delay, rate, RELAYED_CONNECT_TIMEOUT
        )
    except HopUnreachable as e:
        await forwarder.stop()
        why.append(f"through relay {relay}: {forwarder.last_error or str(e).split(': ', 1)[-1]}")
        raise HopUnreachable("; ".join(why)) from None
    hop.through, hop.forwarder = relay, forwarder
    return hop, seconds


async def _open(
    address: str,
    epoch: int,
    token: str,
    cert_pem: str,
    identity: Identity | None,
    delay: float,
    rate: float | None,
    timeout: float,
) -> tuple[NextHop, float]:
    """The hop's WebSocket to ``address`` within ``timeout`` seconds (see :func:`dial`)."""
    from .pairing import TUNNEL_SNI

    context: ssl.SSLContext | bool = False  # False: plain ws:// (aiohttp's "no TLS")
    if identity is not None:
        context = client_context(identity, cert_pem)
    url = f"{'wss' if identity is not None else 'ws'}://{address}{HOP_PATH}"
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout))
    t0 = time.perf_counter()
    try:
        ws = await asyncio.wait_for(
            http.ws_connect(
                url,
                max_msg_size=1024,
                compress=0,
                heartbeat=HEARTBEAT,
                headers={TOKEN_HEADER: token},
                ssl=context,
                server_hostname=TUNNEL_SNI if identity is not None else None,
            ),
            timeout,
        )
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
        await http.close()
        raise HopUnreachable(f"{address}: {_say(e, timeout)}") from None
    except asyncio.CancelledError:
        await http.close()
        raise
    keep_unsent_low(ws)  # the outbox orders what waits: let it wait there, not in the kernel
    return NextHop(http, ws, epoch, delay, rate), time.perf_counter() - t0


async def _nothing() -> None:
    """The fallback of a piece before a frame's last: the last one's stands for the frame."""


def _in_pieces(item: tuple[bytes, Callable[[], Awaitable[None]]]) -> list[tuple[bytes, Callable[[], Awaitable[None]]]]:
    """A step's frame in pieces: if the hop goes down before its last piece left, the step's
    fallback runs once (the next stage drops the pieces it had)."""
    return split_item(item, _nothing)


def _say(e: BaseException, timeout: float) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within {timeout:.0f} s"
    if isinstance(e, aiohttp.WSServerHandshakeError) and e.status == 403:
        return "refused (not the pipeline's previous stage)"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return "its certificate is not the member's"
    return str(e) or type(e).__name__
