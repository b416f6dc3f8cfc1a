"""A listener's side of a relay: stay registered, and take the connections relayed to it.

Contract
--------
``BridgeHost(relay, identity, nameplates, hand_over)``: ``start()`` begins a task that keeps
one outbound control connection to the relay at ``relay`` (``HOST:PORT``, see
:mod:`worker_core.bridge_server`), registered under ``identity``'s certificate fingerprint,
proven by signing the relay's nonce with the certificate's key.  Two listeners use it: the
master's group port (the group is the master's fingerprint, which members pin) and, in a paired
group, a worker's hop listener (registered under the member's own fingerprint, which the
previous stage pins: :mod:`worker_core.hops`).  On a ``Call`` it dials the relay back with the
call's session key and, once the relay answers ``Ok``, gives the raw socket (positioned at the
dialer's first TLS byte) to ``hand_over(sock, label)``, which serves it like an accepted
connection (the listener's own TLS contexts: SNI switch and pinning unchanged).  ``label`` is
``"bridge:<relay>#<n>"``, never an address: a relayed peer's identity is its certificate, and
where it is comes from nowhere (see :func:`is_bridged`).

``nameplates()`` lists the group's open pairing nameplates (a hop listener has none: ``list``);
they are sent at registration and again on :meth:`changed` (and checked at every ping), so the
pairing code alone finds the group at the relay.  A lost or refused control connection is dialled again after a backoff
(0.5 s doubling to ``MAX_BACKOFF``, with jitter): a relay that restarts heals on its own.  A
registration a newer one of the same certificate replaced (the relay says ``replaced``: another
process holds this key, e.g. a restarted one whose predecessor still runs) waits
``MAX_BACKOFF`` before registering again, so two such processes do not take turns every 0.5 s.
``state`` is a :class:`BridgeState`; ``last_error`` says why the last attempt failed.

``mapped_port()`` (0: none) is the port the home router maps to the listener (the master's): at
each registration, and whenever it changes, the relay is asked to check it from outside
(``Check``); ``on_checked(port, reachable, why)`` hears the answer (reachable: this master's own
certificate answered there).
``stop()`` ends the task and every dial-back in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TYPE_CHECKING

from .bridge_wire import (
    REPLACED,
    Accept,
    BridgeError,
    Call,
    Challenge,
    Check,
    Checked,
    Error,
    Malformed,
    Nameplates,
    Ok,
    Ping,
    Pong,
    Proof,
    Register,
    Registered,
    b64,
    encode,
    proof_message,
    read_frame,
    sock_reader,
    split_address,
)

if TYPE_CHECKING:
    from .identity import Identity

log = logging.getLogger("molink.bridge")

BRIDGED = "bridge:"  # the prefix of a relayed connection's label (link.peer)
CONNECT_TIMEOUT = 10.0  # seconds to reach the relay
ANSWER_TIMEOUT = 10.0  # seconds for the relay's answer to a registration step or dial-back
PING_INTERVAL = 15.0  # seconds between pings on the control connection (the relay drops it after 45)
MAX_BACKOFF = 30.0  # the longest wait between two registration attempts


def is_bridged(peer: str) -> bool:
    """Whether a link's peer label names a relayed connection (it is no address)."""
    return peer.startswith(BRIDGED)


class BridgeState(Enum):
    CONNECTING = "connecting"
    REGISTERED = "registered"
    BACKING_OFF = "backing off"
    STOPPED = "stopped"


_NEXT: dict[BridgeState, frozenset[BridgeState]] = {
    BridgeState.CONNECTING: frozenset({BridgeState.REGISTERED, BridgeState.BACKING_OFF, BridgeState.STOPPED}),
    BridgeState.REGISTERED: frozenset({BridgeState.BACKING_OFF, BridgeState.STOPPED}),
    BridgeState.BACKING_OFF: frozenset({BridgeState.CONNECTING, BridgeState.STOPPED}),
    BridgeState.STOPPED: frozenset(),
}


class BridgeHost:
    def __init__(
        self,
        relay: str,
        identity: Identity,
        nameplates: Callable[[], list[str]],
        hand_over: Callable[[socket.socket, str], Awaitable[None]],
        mapped_port: Callable[[], int] = lambda: 0,
        on_checked: Callable[[int, bool, str], object] = lambda port, ok, why: None,
    ) -> None:
        self.relay = relay
        self.mapped_port = mapped_port
        self.on_checked = on_checked
        self.host, self.port = split_address(relay)
        self.identity = identity
        self.nameplates = nameplates
        self.hand_over = hand_over
        self.state = BridgeState.CONNECTING
        self.last_error = ""
        self.registrations = 0  # successful registrations (1 + heals)
        self.relayed = 0  # connections taken through the relay
        self._task: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._key = None

    def _to(self, state: BridgeState) -> None:
        if state is self.state:
            return
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"bridge: {self.state.value} -> {state.value} is not a transition")
        self.state = state

    async def start(self) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        raw = await asyncio.to_thread(self.identity.key_path.read_bytes)
        self._key = load_pem_private_key(raw, password=None)
        self._task = asyncio.create_task(self._keep_registered())

    async def stop(self) -> None:
        self._to(BridgeState.STOPPED)
        tasks = [t for t in (self._task, *self._calls) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def changed(self) -> None:
        """The open nameplates changed: tell the relay."""
        self._changed.set()

    def _sign(self, nonce: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        message = proof_message(nonce, self.identity.fingerprint)
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return b64(self._key.sign(message, ec.ECDSA(hashes.SHA256())))
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return b64(self._key.sign(message))
        raise ValueError("this identity's key cannot sign a relay registration (ECDSA or Ed25519 needed)")

    # ------------------------------------------------------------------ the control connection
    async def _keep_registered(self) -> None:
        backoff = 0.5
        while True:
            self._to(BridgeState.CONNECTING)
            try:
                await self._session()
                self.last_error = "the relay closed the control connection"
            except BridgeError as e:
                self.last_error = f"the relay refused: {e}"
                if e.code == REPLACED:  # another process holds this certificate's key: no tug of war
                    backoff = MAX_BACKOFF
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                self.last_error = f"relay {self.relay} unreachable: {type(e).__name__}: {e}"
            if self.state is BridgeState.REGISTERED and backoff < MAX_BACKOFF:
                backoff = 0.5  # it was up: come back quickly
            self._to(BridgeState.BACKING_OFF)
            log.warning("%s; registering again in %.1f s", self.last_error, backoff)
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(MAX_BACKOFF, backoff * 2)

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT)
        try:
            sent = sorted(self.nameplates())
            writer.write(encode(Register(self.identity.fingerprint, self.identity.cert_pem, tuple(sent))))
            challenge = await self._answer(reader)
            if not isinstance(challenge, Challenge):
                raise BridgeError(f"expected a challenge, got {type(challenge).__name__}")
            writer.write(encode(Proof(self._sign(challenge.nonce))))
            if not isinstance(ok := await self._answer(reader), Registered):
                raise BridgeError(f"expected registered, got {type(ok).__name__}")
            self._to(BridgeState.REGISTERED)
            self.registrations += 1
            log.info("registered at relay %s (group %s)", self.relay, self.identity.fingerprint[:16])
            asked = self.mapped_port()
            if asked:
                writer.write(encode(Check(asked)))  # is the mapped port reachable from outside?
            pinger = asyncio.create_task(self._ping(writer, sent, asked))
            try:
                while True:
                    msg = await read_frame(reader.readexactly)
                    if isinstance(msg, Call):
                        task = asyncio.create_task(self._dial_back(msg))
                        self._calls.add(task)
                        task.add_done_callback(self._calls.discard)
                    elif isinstance(msg, Checked):
                        self._checked(msg)
                    elif isinstance(msg, Error):
                        raise Malformed(f"{msg.reason} ({msg.code})", code=msg.code)
                    elif not isinstance(msg, Pong):
                        raise BridgeError(f"unexpected {type(msg).__name__} on the control connection")
            finally:
                pinger.cancel()
                await asyncio.gather(pinger, return_exceptions=True)
        finally:
            writer.close()

    async def _ping(self, writer: asyncio.StreamWriter, sent: list[str], asked: int) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), PING_INTERVAL)
            self._changed.clear()
            now = sorted(self.nameplates())
            if now != sent:
                writer.write(encode(Nameplates(tuple(now))))
                sent = now
            port = self.mapped_port()
            if port and port != asked:  # the mapping moved: check the new port
                writer.write(encode(Check(port)))
                asked = port
            writer.write(encode(Ping()))
            await writer.drain()

    def _checked(self, msg: Checked) -> None:
        """The relay's answer to a ``Check``: reachable when this master's certificate answered."""
        ok = msg.fingerprint == self.identity.fingerprint
        why = "" if ok else (msg.reason or "another certificate answered there")
        log.info("relay %s checked port %d from outside: %s", self.relay, msg.port, "reachable" if ok else why)
        self.on_checked(msg.port, ok, why)

    @staticmethod
    async def _answer(reader: asyncio.StreamReader) -> object:
        msg = await asyncio.wait_for(read_frame(reader.readexactly), ANSWER_TIMEOUT)
        if isinstance(msg, Error):
            raise BridgeError(f"{msg.reason} ({msg.code})")
        return msg

    # ------------------------------------------------------------------ a relayed connection
    async def _dial_back(self, call: Call) -> None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_sendall(sock, encode(Accept(call.session)))
            answer = await asyncio.wait_for(read_frame(sock_reader(sock)), ANSWER_TIMEOUT)
            if isinstance(answer, Error):
                raise BridgeError(f"{answer.reason} ({answer.code})")
            if not isinstance(answer, Ok):
                raise BridgeError(f"expected ok, got {type(answer).__name__}")
        except (BridgeError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            log.warning("a call through relay %s failed: %s", self.relay, e or type(e).__name__)
            if sock is not None:
                sock.close()
            return
        self.relayed += 1
        label = f"{BRIDGED}{self.relay}#{self.relayed}"
        try:
            await self.hand_over(sock, label)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:  # e.g. a dialer that is no member: refused
            log.warning("relayed connection %s ended in its handshake: %s", label, e or type(e).__name__)
            sock.close()
