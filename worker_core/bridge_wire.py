"""The bridge preamble: the few typed frames spoken with a relay before its bytes are spliced.

Contract
--------
A relay ("bridge" in the code: ``journey.Relay`` already names master-forwarded hops) splices
two TCP connections so that the group's pinned mutual TLS runs end to end through it.  Before
the TLS bytes, each connection speaks this small preamble.  A frame is::

    b"MLBR"  version (1 byte, VERSION)  length (2 bytes, big endian, <= MAX_BODY)  body

and the body is a UTF-8 JSON object with a ``type``.  :func:`parse` turns it into one of the
frozen dataclasses below (parse, don't validate: every field is typed and bounded here, so
the relay, the master and the dialers trust what they get); anything else raises
:class:`Malformed`.  A wrong magic or version raises :class:`Malformed` (code ``version``) and a
length over ``MAX_BODY`` :class:`TooLarge` before the body is read.  Nothing is pickled.

Who sends what (every first frame within the relay's preamble timeout):

* the master's control connection: ``Register(group, cert, nameplates)`` -> ``Challenge(nonce)``
  -> ``Proof(signature)`` -> ``Registered``; then ``Ping``/``Pong`` and ``Nameplates`` updates
  from the master, ``Call(session, nameplate)`` from the relay when someone dials the group.
  The proof is the master's certificate key signing :func:`proof_message` (the nonce and the
  group); the group *is* the certificate's SHA-256 fingerprint.
* a dialer: ``Dial(group=FP)`` or ``Dial(nameplate=NN)`` -> ``Ok`` once the master dialled back,
  then the spliced bytes (the dialer's TLS ClientHello is the first).
* the master's data connection for a call: ``Accept(session)`` -> ``Ok``, then the spliced bytes.
* any refusal: ``Error(code, reason)``, then the relay closes.
* on the control connection, ``Check(port)`` from the master: the relay dials the address the
  control connection comes from at ``port`` (nothing else: it is no port scanner for anyone),
  makes a TLS handshake there (server name :data:`CHECK_SNI`, no certificate checked) and answers
  ``Checked(port, fingerprint, reason)``: the SHA-256 fingerprint of the certificate that
  answered ("" with the reason when nothing did).  So a master learns, from outside its home,
  whether its mapped port reaches it.

``read_frame(recv_exactly)`` reads one frame through a callable that returns exactly ``n``
bytes (a stream's ``readexactly`` or :func:`sock_reader`'s, which never reads past the frame,
so the TLS bytes that follow stay in the socket); ``encode(msg)`` is the other way.
Imports the standard library only (no torch): the relay runs on any small host.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields

MAGIC = b"MLBR"
VERSION = 1
HEADER = struct.Struct(">4sBH")  # magic, version, body length
MAX_BODY = 8192  # bytes of JSON in one frame (a PEM certificate is ~700)
MAX_NAMEPLATES = 100  # pairing codes have 90 nameplates (10..99)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_NAMEPLATE = re.compile(r"[1-9][0-9]")

PROOF_LABEL = b"molink-bridge-register/1\x00"
CHECK_SNI = "molink-pair"  # the group port's pairing server name (worker_core.pairing.PAIR_SNI): no client certificate


REPLACED = "replaced"  # Error code: a newer registration of the same certificate took this one's place


class BridgeError(Exception):
    """A preamble that cannot be used; ``code`` is the machine-readable reason."""

    code = "malformed"


class Malformed(BridgeError):
    code = "malformed"

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


class TooLarge(BridgeError):
    code = "too_large"


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Register:
    group: str  # the master certificate's SHA-256 fingerprint, 64 hex digits
    cert: str  # that certificate, PEM
    nameplates: tuple[str, ...] = ()  # open pairing codes' nameplates, so the code alone finds the group


@dataclass(frozen=True)
class Challenge:
    nonce: str  # 32 hex digits, fresh per registration


@dataclass(frozen=True)
class Proof:
    signature: str  # base64 of the certificate key's signature over proof_message(nonce, group)


@dataclass(frozen=True)
class Registered:
    pass


@dataclass(frozen=True)
class Nameplates:
    nameplates: tuple[str, ...]


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Check:
    port: int  # dial the control connection's own address at this port


@dataclass(frozen=True)
class Checked:
    port: int
    fingerprint: str  # SHA-256 of the certificate that answered there, 64 hex digits; "": nothing did
    reason: str = ""  # why not, when nothing did


@dataclass(frozen=True)
class Dial:
    group: str = ""  # fingerprint, or
    nameplate: str = ""  # a pairing code's first two digits


@dataclass(frozen=True)
class Call:
    session: str  # 32 hex digits: single use, expires
    nameplate: str = ""  # what the dialer asked by, if a nameplate


@dataclass(frozen=True)
class Accept:
    session: str


@dataclass(frozen=True)
class Ok:
    pass


@dataclass(frozen=True)
class Error:
    code: str  # unknown_group, bad_proof, unknown_session, used_session, expired_session, busy, ...
    reason: str


Message = (
    Register
    | Challenge
    | Proof
    | Registered
    | Nameplates
    | Ping
    | Pong
    | Check
    | Checked
    | Dial
    | Call
    | Accept
    | Ok
    | Error
)
_TYPES: dict[str, type] = {
    c.__name__.lower(): c
    for c in (
        Register,
        Challenge,
        Proof,
        Registered,
        Nameplates,
        Ping,
        Pong,
        Check,
        Checked,
        Dial,
        Call,
        Accept,
        Ok,
        Error,
    )
}


def _text(obj: dict, key: str, limit: int, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str) or len(value) > limit:
        raise Malformed(f"{key}: a string of at most {limit} characters is required")
    if value and pattern is not None and not pattern.fullmatch(value):
        raise Malformed(f"{key}: malformed")
    if required and not value:
        raise Malformed(f"{key}: missing")
    return value


def _nameplates(obj: dict) -> tuple[str, ...]:
    value = obj.get("nameplates", [])
    if not isinstance(value, list) or len(value) > MAX_NAMEPLATES:
        raise Malformed(f"nameplates: a list of at most {MAX_NAMEPLATES} is required")
    if not all(isinstance(n, str) and _NAMEPLATE.fullmatch(n) for n in value):
        raise Malformed("nameplates: each is two digits, 10..99")
    return tuple(dict.fromkeys(value))


def _port(obj: dict) -> int:
    value = obj.get("port")
    if type(value) is not int or not 0 < value < 65536:
        raise Malformed("port: an integer 1..65535 is required")
    return value


def parse(obj: object) -> Message:
    """The typed message of a decoded JSON body, or :class:`Malformed`."""
    if not isinstance(obj, dict):
        raise Malformed("a frame body is a JSON object")
    name = obj.get("type")
    kind = _TYPES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise Malformed(f"unknown frame type {str(obj.get('type'))[:32]!r}")
    if kind is Register:
        return Register(_text(obj, "group", 64, _HEX64), _text(obj, "cert", MAX_BODY - 512), _nameplates(obj))
    if kind is Challenge:
        return Challenge(_text(obj, "nonce", 32, _HEX32))
    if kind is Proof:
        return Proof(_text(obj, "signature", 1024))
    if kind is Nameplates:
        return Nameplates(_nameplates(obj))
    if kind is Check:
        return Check(_port(obj))
    if kind is Checked:
        fingerprint = _text(obj, "fingerprint", 64, _HEX64, required=False)
        return Checked(_port(obj), fingerprint, _text(obj, "reason", 300, required=False))
    if kind is Dial:
        group = _text(obj, "group", 64, _HEX64, required=False)
        nameplate = _text(obj, "nameplate", 2, _NAMEPLATE, required=False)
        if bool(group) == bool(nameplate):
            raise Malformed("dial names exactly one of group and nameplate")
        return Dial(group, nameplate)
    if kind is Call:
        return Call(_text(obj, "session", 32, _HEX32), _text(obj, "nameplate", 2, _NAMEPLATE, required=False))
    if kind is Accept:
        return Accept(_text(obj, "session", 32, _HEX32))
    if kind is Error:
        return Error(_text(obj, "code", 32), _text(obj, "reason", 300, required=False))
    return kind()


def encode(msg: Message) -> bytes:
    body: dict[str, object] = {"type": type(msg).__name__.lower()}
    for f in fields(msg):
        value = getattr(msg, f.name)
        body[f.name] = list(value) if isinstance(value, tuple) else value
    raw = json.dumps(body, separators=(",", ":")).encode()
    if len(raw) > MAX_BODY:
        raise TooLarge(f"frame body of {len(raw)} bytes (at most {MAX_BODY})")
    return HEADER.pack(MAGIC, VERSION, len(raw)) + raw


async def read_frame(recv_exactly: Callable[[int], Awaitable[bytes]]) -> Message:
    """One frame; raises :class:`BridgeError`, or ``asyncio.IncompleteReadError``/``OSError``
    when the connection ends first."""
    magic, version, length = HEADER.unpack(await recv_exactly(HEADER.size))
    if magic != MAGIC:
        raise Malformed("not a MoLink bridge preamble", code="version")
    if version != VERSION:
        raise Malformed(f"bridge preamble version {version}; this side speaks {VERSION}", code="version")
    if length > MAX_BODY:
        raise TooLarge(f"preamble frame of {length} bytes (at most {MAX_BODY})")
    body = await recv_exactly(length)
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Malformed("a frame body is UTF-8 JSON") from None
    return parse(obj)


def sock_reader(sock: socket.socket) -> Callable[[int], Awaitable[bytes]]:
    """``recv_exactly`` over a non-blocking socket that never reads past what is asked."""
    loop = asyncio.get_running_loop()

    async def recv_exactly(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await loop.sock_recv(sock, n - len(out))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += chunk
        return bytes(out)

    return recv_exactly


def proof_message(nonce: str, group: str) -> bytes:
    """What the master signs to register ``group`` at a relay that sent ``nonce``."""
    return PROOF_LABEL + bytes.fromhex(nonce) + bytes.fromhex(group)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise Malformed("signature: not base64") from None


def split_address(text: str, listen: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) of a relay, or ``ValueError`` with one line; a port of 0
    (any free one) only where ``listen``."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    low = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536 or any(c in host for c in "/ @"):
        raise ValueError(f"a relay address is HOST:PORT, got {text!r}")
    return host, int(port)
