"""The group port: where paired machines open their tunnels and new machines pair.

Contract
--------
``GroupPort(identity, members, invitations, accept_tunnel)`` serves, on one TLS 1.3 port:

* ``/v1/pair``: the master's side of pairing (``worker_core.pairing``), for clients that
  connect with the TLS server name ``molink-pair`` and no client certificate.  Codes come from
  ``invitations`` (single use, expiry, burn after failed attempts); a successful pairing adds
  the joiner to ``members`` and tells it the master's certificate.
* ``/v1/tunnel``: worker tunnels.  The handshake itself accepts only the current members'
  certificates (each new handshake is switched to ``members.tls_context``, so a removed
  member's next handshake fails); a client without a certificate is refused with 403.
  ``accept_tunnel(request, member_name)`` then runs the tunnel.  ``candidates()`` (JSON
  objects of :class:`worker_core.candidates.Candidate`) is sealed into each welcome: the joiner
  learns every address of this port under the PAKE key.
* ``/v1/probe?bytes=N``: members time their link (round trip, download bandwidth).

Every pairing outcome is logged without the code.  ``start(host, port)`` binds (``"::"``: IPv4
and IPv6 on one port, IPv4 alone where the machine has no IPv6); ``port`` tells the bound port;
``stop()`` closes the listeners.

``accept_bridged(sock, label)`` serves a connection a relay spliced to this master (see
:mod:`worker_core.bridge_host`) exactly as an accepted one: same TLS contexts, same routes.
``peer(request)`` names who a request came from: the relayed connection's ``label`` (never the
relay's address, which every relayed member shares), else the socket's peer address.
``relay`` (``HOST:PORT``, or "") is sealed into the pairing welcome, so members learn it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

from worker_core.identity import Identity, check_cert_pem, der_fingerprint, server_context
from worker_core.listen import bind, families
from worker_core.pairing import (
    PAIR_SNI,
    PAIRING_VERSION,
    Malformed,
    PairingError,
    PairingSession,
    Refused,
    WrongCode,
    b64,
    unb64,
)

from .invitations import Invitations
from .members import Members

log = logging.getLogger("molink.group_port")

PAIR_TIMEOUT = 30.0  # seconds for each pairing message


class GroupPort:
    def __init__(
        self,
        identity: Identity,
        members: Members,
        invitations: Invitations,
        accept_tunnel: Callable[[web.Request, str], Awaitable[web.StreamResponse]],
        candidates: Callable[[], list[dict]] | None = None,
    ) -> None:
        self.identity = identity
        self.members = members
        self.invitations = invitations
        self.accept_tunnel = accept_tunnel
        self.candidates = candidates or list  # where this port can be reached, sealed into each welcome
        self.port = 0
        self.relay = ""
        self._runner: web.AppRunner | None = None
        self._bridged: dict[tuple, tuple[socket.socket, str]] = {}  # (sockname, peername) -> (socket, label)
        self._pairing_ctx = server_context(identity, [])  # no client certificate accepted
        self._base = server_context(identity, [])
        self._base.sni_callback = self._switch

    def _switch(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self._pairing_ctx if server_name == PAIR_SNI else self.members.tls_context

    async def start(self, host: str, port: int) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.add_routes(
            [web.get("/v1/pair", self._pair), web.get("/v1/tunnel", self._tunnel), web.get("/v1/probe", self._probe)]
        )
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self.port = await bind(self._runner, families(host), port, self._base, "group port")

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def accept_bridged(self, sock: socket.socket, label: str) -> None:
        """Serve ``sock`` (a relay's data connection, at the dialer's first TLS byte)."""
        if self._runner is None or self._runner.server is None:
            sock.close()
            return
        self._bridged = {k: v for k, v in self._bridged.items() if v[0].fileno() != -1}  # closed ones go
        self._bridged[(sock.getsockname(), sock.getpeername())] = (sock, label)
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(self._runner.server, sock, ssl=self._base)

    def peer(self, request: web.Request) -> str:
        transport = request.transport
        if transport is not None and self._bridged:
            found = self._bridged.get((transport.get_extra_info("sockname"), transport.get_extra_info("peername")))
            if found is not None:
                return found[1]
        return request.remote or "?"

    def _member(self, request: web.Request) -> str:
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = sslobj.getpeercert(binary_form=True) if sslobj else None
        member = self.members.member_for(der_fingerprint(der)) if der else None
        if member is None:
            log.warning("%s from %s refused: no member certificate", request.path, self.peer(request))
            raise web.HTTPForbidden(text="pair this machine first (molink join CODE)")
        return member.name

    async def _tunnel(self, request: web.Request) -> web.StreamResponse:
        return await self.accept_tunnel(request, self._member(request))

    async def _probe(self, request: web.Request) -> web.StreamResponse:
        """Members measure their link: ``?bytes=N`` (at most 64 MiB) of zeros."""
        self._member(request)
        try:
            n = int(request.query.get("bytes", "0"))
        except ValueError:
            n = -1
        if not 0 <= n <= 64 * 1024 * 1024:
            raise web.HTTPBadRequest(text="bytes must be 0..67108864")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Content-Length": str(n)})
        await resp.prepare(request)
        block = bytes(min(n, 1 << 20))
        while n > 0:
            await resp.write(block[: min(n, len(block))])
            n -= len(block)
        await resp.write_eof()
        return resp

    async def _pair(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024, heartbeat=None)
        await ws.prepare(request)
        peer = self.peer(request)
        nameplate: str | None = None
        succeeded = False
        try:
            first = await self._receive(ws)
            nameplate = first.get("nameplate")
            if first.get("type") != "pake" or first.get("version") != PAIRING_VERSION or not isinstance(nameplate, str):
                raise Malformed("malformed pairing request")
            try:
                code = self.invitations.begin(nameplate, time.monotonic())
            except PairingError:
                nameplate = None  # nothing begun: nothing to count
                raise
            session = PairingSession(code, master=True)
            session.finish(unb64(first.get("pake")))
            await ws.send_json({"type": "pake", "pake": b64(session.outbound), "confirm": b64(session.confirmation())})
            second = await self._receive(ws)
            if second.get("type") != "confirm":
                raise Malformed("malformed pairing confirmation")
            if not session.check_peer_confirmation(unb64(second.get("confirm"))):
                raise WrongCode("wrong pairing code")
            sealed = session.open(second.get("sealed"))
            asked, cert = sealed.get("name"), sealed.get("cert")
            if not isinstance(asked, str) or len(asked) > 128:
                raise Malformed("malformed joiner name")
            if not isinstance(cert, str):
                raise Malformed("joiner certificate: not a PEM text")
            try:
                cert = check_cert_pem(cert)
            except ValueError as e:
                raise Malformed(f"joiner certificate: {e}") from None
            name = self.members.add(asked, cert)
            self.invitations.succeed(nameplate)
            succeeded = True
            await ws.send_json(
                {
                    "type": "welcome",
                    "sealed": session.seal(
                        {
                            "group": self.members.group,
                            "cert": self.identity.cert_pem,
                            "name": name,
                            "candidates": self.candidates(),
                        }
                        | ({"relay": self.relay} if self.relay else {})
                    ),
                }
            )
            log.info("pairing from %s succeeded: member %s", peer, name)
        except (PairingError, asyncio.TimeoutError, ConnectionError) as e:
            failure = e if isinstance(e, PairingError) else Refused("pairing timed out or the joiner left")
            log.warning("pairing from %s failed: %s", peer, failure)
            if not ws.closed:
                with contextlib.suppress(ConnectionError):  # the joiner is gone: nobody to tell
                    await ws.send_json({"type": "error", "reason": str(failure), "code": failure.code})
        finally:
            if nameplate is not None and not succeeded:
                self.invitations.fail(nameplate)
            await ws.close()
        return ws

    @staticmethod
    async def _receive(ws: web.WebSocketResponse) -> dict:
        msg = await ws.receive(timeout=PAIR_TIMEOUT)
        if msg.type != WSMsgType.TEXT:
            raise PairingError(
                "the joiner left"
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
                else "malformed pairing message"
            )
        try:
            obj = json.loads(msg.data)
        except ValueError:
            raise PairingError("malformed pairing message") from None
        if not isinstance(obj, dict):
            raise PairingError("malformed pairing message")
        return obj
