"""The relay (``molink relay``): splices a dialer's bytes to a registered master's, and nothing else.

Contract
--------
``BridgeServer(limits)``; ``await start(host, port)`` listens (``port`` 0 picks one: read
``port``), ``await stop()`` closes every connection and waits (bounded) for its tasks.  It
runs in its own small process (``molink relay``, no torch) or inside any reachable member.

It speaks :mod:`worker_core.bridge_wire`.  A master registers its group over a control
connection, proving possession of its certificate key (a signed fresh nonce); the group is
keyed by that certificate's fingerprint, and a newer registration of the same group replaces
the older one (which is told ``replaced`` and closed).  A dialer asks for a group (fingerprint,
or the nameplate of an open pairing code); the relay sends the master a ``Call`` with a fresh
session key (single use, expiring after ``answer_timeout``), the master dials back with
``Accept(key)``, both get ``Ok`` and the relay copies bytes between them until both ends are
done.  It never parses what it copies:
the group's pinned mutual TLS runs end to end, so it can neither join, read nor alter.

Bad input gets an ``Error`` frame with a code and one line, then a close, and touches nothing
else: unknown group or nameplate, a nameplate two groups claim, wrong proof, an unknown, used
or expired session key, a malformed, oversize or wrong-version preamble, no preamble within
``preamble_timeout`` (a half-open connection), more than ``max_connections`` (or
``max_per_ip``) open connections or ``max_sessions_per_group`` sessions, a master that does
not answer.  Spliced sessions are rate-limited per direction (``session_rate``) and together
(``global_rate``), closed after ``idle_timeout`` without a byte, and, once one side ended
(half-close is passed on), closed ``half_open_timeout`` later.  A control connection silent
for ``control_timeout`` is dropped (the master pings).  A registered master may ask the relay to
check its port from outside (``Check``): the relay dials only the master's own address, once per
``check_interval``, bounded by ``check_timeout``, and says whose certificate answered.

Each direction of a splice is gated on the leg it writes to (:mod:`worker_core.inflight`, Linux:
the relay reads on only while that leg's path has room, so a slow second leg's router queue does
not fill), and once that gate has measured the leg's rate, what the relay takes from the other
leg is bounded to about a round trip of it (:mod:`worker_core.intake`): what waits then waits
in the sender's queue, where its decode frames pass its prefill pieces.

``tap(session, direction, data)``, when given, sees every spliced chunk ("up": dialer to
master): for tests and measurement only.  ``stats()`` counts groups, sessions and bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .bridge_wire import (
    CHECK_SNI,
    REPLACED,
    Accept,
    BridgeError,
    Call,
    Challenge,
    Check,
    Checked,
    Dial,
    Error,
    Message,
    Nameplates,
    Ok,
    Ping,
    Pong,
    Proof,
    Register,
    Registered,
    encode,
    proof_message,
    read_frame,
    unb64,
)
from .inflight import gate
from .intake import Intake
from .outbox import ROOM_POLL  # seconds between looks at a gated leg with no room, as the outboxes'
from .tasks import end_tasks
from .unsent import keep_unsent_low

log = logging.getLogger("molink.relay")

CHUNK = 64 * 1024  # bytes copied at once
GATED_CHUNK = 16 * 1024  # bytes copied at once into a gated leg with little room (a piece: wire.PART_BYTES)
# the queue a gated leg's router may hold: a byte the relay holds back delays every frame behind
# it (decode ones too: it cannot read them), so it holds back only beyond a receiver's delayed
# acknowledgement (40 ms on Linux); at the gate's 15 ms a relay whose first leg was the slowest
# added 45 ms to its urgent frames' p90 (docs/benchmarks.md, 2026-12-07, night)
RELAY_QUEUE_SECONDS = 0.05
_SPENT_KEYS = 4096  # used or expired session keys remembered, to say why a key is refused


@dataclass(frozen=True)
class BridgeLimits:
    max_connections: int = 1024  # open connections of every kind
    max_per_ip: int = 64  # open connections from one address
    max_groups: int = 1000  # registered groups
    max_sessions_per_group: int = 128  # spliced or pending sessions of one group
    session_rate: float = 12.5e6  # bytes/s per direction of one session (100 Mbit/s)
    global_rate: float = 125e6  # bytes/s over all sessions and directions (1 Gbit/s)
    preamble_timeout: float = 5.0  # seconds for a new connection's first frame (and the proof)
    answer_timeout: float = 10.0  # seconds for the master's dial-back; a session key lives this long
    idle_timeout: float = 300.0  # seconds a spliced session may carry no byte
    half_open_timeout: float = 30.0  # seconds a session lives on after one side ended
    control_timeout: float = 45.0  # seconds a master's control connection may stay silent
    check_interval: float = 10.0  # seconds between two reachability checks of one group's port
    check_timeout: float = 5.0  # seconds a check may take (connect and TLS handshake)


class Bucket:
    """A token bucket: ``await take(n)`` waits until ``n`` bytes fit the rate (burst: one second)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.level = rate
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.at) * self.rate)
        self.at = now
        self.level -= n
        if self.level < 0:
            await asyncio.sleep(-self.level / self.rate)


@dataclass
class _Group:
    fingerprint: str
    writer: asyncio.StreamWriter  # the control connection
    nameplates: frozenset[str] = frozenset()
    sessions: int = 0
    checked_at: float = -math.inf  # monotonic time of the last reachability check


@dataclass
class _Pending:
    group: str
    expires: float  # monotonic
    # the master's data connection (reader, writer), set by its Accept
    answered: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # set when the splice is over: the Accept's handler waits for it, so its connection lives as long
    released: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BridgeServer:
    def __init__(
        self, limits: BridgeLimits | None = None, tap: Callable[[str, str, bytes], None] | None = None
    ) -> None:
        self.limits = limits or BridgeLimits()
        self.tap = tap
        self.port = 0
        self.groups: dict[str, _Group] = {}
        self._pending: dict[str, _Pending] = {}
        self._spent: OrderedDict[str, str] = OrderedDict()  # key -> "used" | "expired"
        self._per_ip: dict[str, int] = {}
        self._open = 0
        self._global = Bucket(self.limits.global_rate)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.bytes_spliced = 0
        self.sessions_spliced = 0
        self.checks = 0  # reachability checks made (Check)
        self.refused: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=GATED_CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("relay listening on %s:%d", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await end_tasks(list(self._tasks))  # cancelled until they end, bounded (5 s)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def stats(self) -> dict:
        return {
            "groups": len(self.groups),
            "pending": len(self._pending),
            "open_connections": self._open,
            "sessions_spliced": self.sessions_spliced,
            "bytes_spliced": self.bytes_spliced,
            "checks": self.checks,
            "refused": dict(self.refused),
        }

    # ------------------------------------------------------------------ connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        self._open += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        try:
            if self._open > self.limits.max_connections:
                await self._refuse(writer, "busy", "the relay has too many connections; try again later")
                return
            if self._per_ip[ip] > self.limits.max_per_ip:
                await self._refuse(writer, "busy", "too many connections from your address")
                return
            try:
                first = await asyncio.wait_for(read_frame(reader.readexactly), self.limits.preamble_timeout)
            except BridgeError as e:
                await self._refuse(writer, e.code, str(e))
                return
            except asyncio.TimeoutError:
                await self._refuse(writer, "timeout", "no preamble in time")
                return
            if isinstance(first, Register):
                await self._control(first, reader, writer)
            elif isinstance(first, Dial):
                await self._dial(first, reader, writer)
            elif isinstance(first, Accept):
                await self._accept(first, reader, writer)
            else:
                await self._refuse(
                    writer,
                    "malformed",
                    f"a connection starts with register, dial or accept, not {type(first).__name__.lower()}",
                )
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the peer left: nothing to tell
        except asyncio.CancelledError:
            pass  # stop(): this handler's task is the relay's own, and it ends here
        finally:
            self._open -= 1
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]
            writer.close()
            self._tasks.discard(task)

    async def _refuse(self, writer: asyncio.StreamWriter, code: str, reason: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        log.info("refused %s: %s (%s)", writer.get_extra_info("peername"), reason, code)
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(encode(Error(code, reason[:300])))
            await asyncio.wait_for(writer.drain(), 2)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, msg: Message) -> None:
        writer.write(encode(msg))
        await asyncio.wait_for(writer.drain(), 10)

    # ------------------------------------------------------------------ masters
    async def _control(self, reg: Register, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if reg.group not in self.groups and len(self.groups) >= self.limits.max_groups:
            await self._refuse(writer, "busy", "the relay serves as many groups as it can")
            return
        nonce = secrets.token_hex(16)
        await self._send(writer, Challenge(nonce))
        try:
            proof = await asyncio.wait_for(read_frame(reader.readexactly), self.limits.preamble_timeout)
        except BridgeError as e:
            await self._refuse(writer, e.code, str(e))
            return
        except asyncio.TimeoutError:
            await self._refuse(writer, "timeout", "no proof in time")
            return
        if not isinstance(proof, Proof):
            await self._refuse(writer, "malformed", "expected the registration proof")
            return
        try:
            _verify(reg, nonce, unb64(proof.signature))
        except BridgeError as e:
            await self._refuse(writer, "bad_proof", str(e))
            return
        old = self.groups.get(reg.group)
        group = _Group(reg.group, writer, frozenset(reg.nameplates), old.sessions if old else 0)
        self.groups[reg.group] = group
        if old is not None:  # the master reconnected (its older control connection is stale), or another process
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                old.writer.write(encode(Error(REPLACED, "a newer registration of this certificate replaced this one")))
            old.writer.close()
        await self._send(writer, Registered())
        log.info("group %s registered (%d nameplate(s))", reg.group[:16], len(reg.nameplates))
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(read_frame(reader.readexactly), self.limits.control_timeout)
                except asyncio.TimeoutError:
                    log.info("group %s: control connection silent, dropped", reg.group[:16])
                    return
                except BridgeError as e:
                    await self._refuse(writer, e.code, str(e))
                    return
                if isinstance(msg, Ping):
                    await self._send(writer, Pong())
                elif isinstance(msg, Nameplates):
                    group.nameplates = frozenset(msg.nameplates)
                elif isinstance(msg, Check):
                    await self._send(writer, await self._check(group, writer, msg.port))
                else:
                    await self._refuse(writer, "malformed", f"unexpected {type(msg).__name__.lower()} on control")
                    return
        finally:
            if self.groups.get(reg.group) is group:
                del self.groups[reg.group]
                log.info("group %s unregistered", reg.group[:16])

    async def _check(self, group: _Group, writer: asyncio.StreamWriter, port: int) -> Checked:
        """Dial the master's own address (where its control connection comes from) at ``port``,
        TLS without checking, and say whose certificate answered; one check per
        ``check_interval`` per group, each bounded by ``check_timeout``."""
        now = time.monotonic()
        if now - group.checked_at < self.limits.check_interval:
            return Checked(port, "", f"one check per {self.limits.check_interval:g} s")
        group.checked_at = now
        self.checks += 1
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # whose certificate it is, is the answer
        try:
            _, w = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=tls, server_hostname=CHECK_SNI), self.limits.check_timeout
            )
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            return Checked(port, "", f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__)
        try:
            der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            w.close()
        log.info("group %s: port %d checked from here", group.fingerprint[:16], port)
        return Checked(port, hashlib.sha256(der).hexdigest() if der else "", "" if der else "no certificate")

    # ------------------------------------------------------------------ dialers
    def _find(self, dial: Dial) -> _Group | str:
        if dial.group:
            return self.groups.get(dial.group) or "no such group is registered at this relay"
        claimed = [g for g in self.groups.values() if dial.nameplate in g.nameplates]
        if len(claimed) > 1:
            return "ambiguous"
        return claimed[0] if claimed else "no group at this relay has an open pairing code starting with that number"

    async def _dial(self, dial: Dial, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        found = self._find(dial)
        if found == "ambiguous":
            await self._refuse(
                writer, "ambiguous_nameplate", "two groups here use that code's nameplate; ask for the link"
            )
            return
        if isinstance(found, str):
            await self._refuse(writer, "unknown_group", found)
            return
        group = found
        if group.sessions >= self.limits.max_sessions_per_group:
            await self._refuse(writer, "busy", "this group has too many relayed connections")
            return
        key = secrets.token_hex(16)
        pending = _Pending(group.fingerprint, time.monotonic() + self.limits.answer_timeout)
        self._pending[key] = pending
        group.sessions += 1
        try:
            try:
                await self._send(group.writer, Call(key, dial.nameplate))
                master_reader, master_writer = await asyncio.wait_for(
                    asyncio.shield(pending.answered), self.limits.answer_timeout
                )
            except (asyncio.TimeoutError, ConnectionError, OSError):
                if self._pending.pop(key, None) is not None:
                    self._spend(key, "expired")
                if pending.answered.done():  # answered just too late: that connection ends too
                    pending.answered.result()[1].close()
                else:
                    pending.answered.cancel()
                if not pending.released.done():
                    pending.released.set_result(None)
                await self._refuse(writer, "no_answer", "the group's master did not answer through the relay")
                return
            try:
                await self._send(writer, Ok())
                await self._send(master_writer, Ok())
                await self._splice(key, reader, writer, master_reader, master_writer)
            finally:
                master_writer.close()
                if not pending.released.done():
                    pending.released.set_result(None)
        finally:
            group.sessions -= 1

    async def _accept(self, acc: Accept, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = self._pending.pop(acc.session, None)
        if pending is None:
            why = self._spent.get(acc.session)
            if why == "used":
                await self._refuse(writer, "used_session", "this session key was already used")
            elif why == "expired":
                await self._refuse(writer, "expired_session", "this session key has expired")
            else:
                await self._refuse(writer, "unknown_session", "no such session key")
            return
        if time.monotonic() > pending.expires:
            self._spend(acc.session, "expired")
            await self._refuse(writer, "expired_session", "this session key has expired")
            return
        self._spend(acc.session, "used")
        if pending.answered.done():  # the dialer gave up meanwhile
            await self._refuse(writer, "expired_session", "this session key has expired")
            return
        pending.answered.set_result((reader, writer))
        await pending.released  # the dialer's task splices; this connection lives until it is done

    def _spend(self, key: str, why: str) -> None:
        self._spent[key] = why
        while len(self._spent) > _SPENT_KEYS:
            self._spent.popitem(last=False)

    # ------------------------------------------------------------------ the splice
    async def _splice(
        self,
        key: str,
        a_reader: asyncio.StreamReader,
        a_writer: asyncio.StreamWriter,
        b_reader: asyncio.StreamReader,
        b_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy a->b ("up") and b->a ("down") until both ended, or the session idles or stays
        half-open too long.  Each direction is rate-limited on its own and against the total."""
        self.sessions_spliced += 1
        for w in (a_writer, b_writer):  # what waits to cross waits in the sender's outbox, in its order
            keep_unsent_low(w.transport)
        limits = self.limits
        last = [time.monotonic()]
        ended: list[float] = []
        session = key[:8]

        async def pump(
            src: asyncio.StreamReader, src_writer: asyncio.StreamWriter, dst: asyncio.StreamWriter, direction: str
        ) -> None:
            bucket = Bucket(limits.session_rate)
            room = gate(dst.transport, RELAY_QUEUE_SECONDS)  # the next leg's path (worker_core.inflight)
            intake = Intake(src_writer.transport)  # and what this leg may hold meanwhile (worker_core.intake)
            try:
                while True:
                    if room is not None and not room.room():
                        if not room.probing:  # its rate measured: this leg holds about a round trip of it
                            intake.bound(room.rate)
                        while not room.room():
                            await asyncio.sleep(ROOM_POLL)
                    size = CHUNK if room is None else min(CHUNK, max(GATED_CHUNK, room.spare))
                    if not (data := await src.read(size)):
                        break
                    last[0] = time.monotonic()
                    await bucket.take(len(data))
                    await self._global.take(len(data))
                    if self.tap is not None:
                        self.tap(session, direction, data)
                    self.bytes_spliced += len(data)
                    if room is not None:
                        room.wrote(len(data))
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()  # pass the half-close on
            except (ConnectionError, OSError):
                pass
            finally:
                ended.append(time.monotonic())

        pumps = [
            asyncio.create_task(pump(a_reader, a_writer, b_writer, "up")),
            asyncio.create_task(pump(b_reader, b_writer, a_writer, "down")),
        ]
        try:
            while not all(p.done() for p in pumps):
                await asyncio.wait(pumps, timeout=min(1.0, limits.idle_timeout / 4, limits.half_open_timeout / 4))
                now = time.monotonic()
                if now - last[0] > limits.idle_timeout:
                    log.info("session %s idle for %.0f s: closed", session, limits.idle_timeout)
                    break
                if ended and now - ended[0] > limits.half_open_timeout:
                    log.info("session %s half-open for %.0f s: closed", session, limits.half_open_timeout)
                    break
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            a_writer.close()
            b_writer.close()


def _verify(reg: Register, nonce: str, signature: bytes) -> None:
    """Raise :class:`BridgeError` unless ``reg.cert`` is the group's certificate and its key signed
    the proof.  ECDSA (the identities' P-256) and Ed25519 keys are accepted."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        der = ssl.PEM_cert_to_DER_cert(reg.cert)
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise BridgeError("the registration certificate is not a PEM certificate") from None
    if hashlib.sha256(der).hexdigest() != reg.group:
        raise BridgeError("the certificate is not the group's (fingerprint differs)")
    key = cert.public_key()
    message = proof_message(nonce, reg.group)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            raise BridgeError("the group's key type is not supported (ECDSA or Ed25519)")
    except InvalidSignature:
        raise BridgeError("the registration proof does not verify with the group's certificate") from None
