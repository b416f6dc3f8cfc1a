"""Pairing: turn a short code read aloud into pinned long-term identities on both sides.

Contract
--------
A pairing code looks like ``47-8203-1956``: a public two-digit *nameplate* (which open
invitation this is) and eight secret digits; the whole code (26.6 bits of secret) is the
SPAKE2 password and is used for nothing else (never hashed, stored or sent).  ``parse_code``
accepts it with any spaces or dashes and raises :class:`NotACode` otherwise.

The exchange, as JSON text frames over a WebSocket (``/v1/pair`` on the master's group port,
TLS without client certificate):

1. joiner -> master ``{"type": "pake", "version": 1, "nameplate", "pake"}``
2. master -> joiner ``{"type": "pake", "pake", "confirm"}`` or ``{"type": "error", "reason", "code"}``
3. joiner -> master ``{"type": "confirm", "confirm", "sealed"}``: sealed = this machine's
   name and certificate
4. master -> joiner ``{"type": "welcome", "sealed"}``: sealed = the group's name, the
   master's certificate, the member name given and (newer masters) ``candidates``: every
   address of the group port (:mod:`worker_core.candidates`), so the PAKE authenticates them;
   or ``{"type": "error", "reason", "code"}``

``reason`` is a sentence for people; ``code`` names the failure for programs (``unknown_code``,
``wrong_code``, ``malformed`` or ``refused``; see :func:`refusal`).  Every failure on either side
is a :class:`PairingError` subclass that says which it was: :class:`NotACode`,
:class:`Unreachable`, :class:`UnknownCode`, :class:`WrongCode`, :class:`Refused`,
:class:`Malformed`, :class:`Impostor`, :class:`NotJoined`.

Both confirmations are HMACs under keys derived (HKDF-SHA256) from the SPAKE2 key and the
transcript, so a wrong code is detected by both sides before anything sealed is opened, and a
man in the middle learns at most whether his one guess per attempt was right.  Sealed
payloads are AES-256-GCM under per-direction keys from the same derivation.  The joiner checks
that the TLS certificate it saw is the one the master sealed, then stores that certificate as
the pinned master identity.  ``PairingSession`` is the pure cryptographic state of one side;
``join`` runs the joiner's side over the network and returns a :class:`JoinedGroup`.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import secrets
import ssl
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path

from .address import format_address
from .candidates import parse_candidate_text, parse_candidates

PAIRING_VERSION = 1
PAIR_SNI = "molink-pair"  # TLS server name selecting the pairing context on the group port
TUNNEL_SNI = "molink"  # TLS server name of member tunnels
MEMBERSHIP_FILE = "membership.json"
_JOINER, _MASTER = b"molink-joiner", b"molink-master"
_CODE_DIGITS = 10  # 2 nameplate + 8 secret


class PairingError(Exception):
    """Pairing failed; the message is one line meant for the user.  The subclass says which
    failure it was (callers decide by type, never by the text); ``code`` names it in the
    master's ``error`` message."""

    code = "refused"


class NotACode(PairingError):
    """The text typed is not a pairing code."""

    code = "not_a_code"


class Unreachable(PairingError):
    """No pairing exchange with that address (refused, unreachable, TLS failure, timeout, dropped)."""

    code = "unreachable"


class UnknownCode(PairingError):
    """That master has no open code on this nameplate (likely another group's master)."""

    code = "unknown_code"


class WrongCode(PairingError):
    """The code's secret digits do not match (or someone is interfering)."""

    code = "wrong_code"


class Refused(PairingError):
    """The master refused this attempt: the code was used, expired or burned, or the exchange broke."""

    code = "refused"


class Malformed(PairingError):
    """A pairing message broke the protocol (or a sealed one did not open)."""

    code = "malformed"


class Impostor(PairingError):
    """The TLS certificate seen is not the one the paired master sealed (someone is interfering)."""

    code = "impostor"


class NotJoined(PairingError):
    """This machine's membership file is missing or damaged."""

    code = "not_joined"


_BY_CODE: dict[str, type[PairingError]] = {cls.code: cls for cls in (UnknownCode, WrongCode, Refused, Malformed)}


def refusal(code: object, message: str) -> PairingError:
    """The typed error for the master's ``error`` message (a code this side does not know: :class:`Refused`)."""
    return _BY_CODE.get(code if isinstance(code, str) else "", Refused)(message)


def make_code(nameplate: int) -> str:
    if not 10 <= nameplate <= 99:
        raise ValueError("nameplate must be two digits")
    secret = secrets.randbelow(10**8)
    return f"{nameplate}-{secret // 10**4:04d}-{secret % 10**4:04d}"


def parse_code(text: str) -> tuple[str, str]:
    """(nameplate, normalised code) of a code as typed by a person."""
    digits = re.sub(r"[\s\-]", "", text or "")
    if not re.fullmatch(rf"\d{{{_CODE_DIGITS}}}", digits) or digits[0] == "0":
        raise NotACode("a pairing code looks like 47-8203-1956 (ten digits)")
    return digits[:2], f"{digits[:2]}-{digits[2:6]}-{digits[6:]}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: object, limit: int = 65536) -> bytes:
    if not isinstance(value, str) or len(value) > limit:
        raise Malformed("malformed pairing message")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise Malformed("malformed pairing message") from None


class PairingSession:
    """One side of one SPAKE2 exchange, with key confirmation and sealing."""

    def __init__(self, code: str, *, master: bool) -> None:
        from spake2 import SPAKE2_A, SPAKE2_B

        self.master = master
        cls = SPAKE2_B if master else SPAKE2_A
        self._pake = cls(code.encode("ascii"), idA=_JOINER, idB=_MASTER)
        self.outbound = self._pake.start()
        self._keys: dict[str, bytes] | None = None

    def finish(self, inbound: bytes) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        from spake2 import SPAKEError

        try:
            key = self._pake.finish(inbound)
        except (SPAKEError, ValueError, TypeError) as e:
            raise Malformed(f"malformed pairing message ({type(e).__name__})") from None
        joiner_msg, master_msg = (inbound, self.outbound) if self.master else (self.outbound, inbound)
        okm = HKDF(
            hashes.SHA256(), 128, salt=None, info=b"molink pairing v1|" + sha256(joiner_msg + master_msg).digest()
        ).derive(key)
        self._keys = {
            "confirm-master": okm[:32],
            "confirm-joiner": okm[32:64],
            "seal-joiner": okm[64:96],
            "seal-master": okm[96:],
        }

    def _k(self, name: str) -> bytes:
        if self._keys is None:
            raise Malformed("pairing exchange not finished")
        return self._keys[name]

    def confirmation(self) -> bytes:
        side = "master" if self.master else "joiner"
        return hmac.new(self._k(f"confirm-{side}"), b"confirm", sha256).digest()

    def check_peer_confirmation(self, value: bytes) -> bool:
        side = "joiner" if self.master else "master"
        return hmac.compare_digest(value, hmac.new(self._k(f"confirm-{side}"), b"confirm", sha256).digest())

    def seal(self, payload: dict) -> str:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        side = "master" if self.master else "joiner"
        nonce = secrets.token_bytes(12)
        return b64(
            nonce + AESGCM(self._k(f"seal-{side}")).encrypt(nonce, json.dumps(payload).encode(), b"molink pairing")
        )

    def open(self, sealed: object) -> dict:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        raw = unb64(sealed)
        side = "joiner" if self.master else "master"
        try:
            data = AESGCM(self._k(f"seal-{side}")).decrypt(raw[:12], raw[12:], b"molink pairing")
            obj = json.loads(data)
        except (InvalidTag, ValueError):
            raise Malformed("sealed pairing message does not open") from None
        if not isinstance(obj, dict):
            raise Malformed("malformed sealed pairing message")
        return obj


@dataclass(frozen=True)
class JoinedGroup:
    """What a joined machine keeps: where its group's master is and how to recognise it."""

    group: str
    name: str  # this machine's member name in the group
    master_host: str
    master_port: int
    master_cert: str  # PEM, pinned
    # every address of the master's group port it sealed into the welcome (Candidate.to_text();
    # worker_core.candidates), raced by the worker; empty from an older master
    candidates: tuple[str, ...] = ()
    relay: str = ""  # HOST:PORT of the group's relay, as the master sealed it in the welcome ("": none)

    @property
    def master_address(self) -> str:
        """``host:port`` of the master, an IPv6 host in brackets (for URLs)."""
        return format_address(self.master_host, self.master_port)

    def save(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / (MEMBERSHIP_FILE + ".tmp")
        raw = asdict(self)
        raw["candidates"] = [c.to_json() for c in parse_candidate_text(",".join(self.candidates))]
        tmp.write_text(json.dumps(raw, indent=2))
        tmp.replace(data_dir / MEMBERSHIP_FILE)

    @staticmethod
    def load(data_dir: Path) -> JoinedGroup:
        path = data_dir / MEMBERSHIP_FILE
        try:
            raw = json.loads(path.read_text())
            return JoinedGroup(
                group=str(raw["group"]),
                name=str(raw["name"]),
                master_host=str(raw["master_host"]),
                master_port=int(raw["master_port"]),
                master_cert=str(raw["master_cert"]),
                candidates=tuple(c.to_text() for c in parse_candidates(raw.get("candidates", []))),
                relay=str(raw.get("relay", "")),
            )
        except FileNotFoundError:
            raise NotJoined(
                f"this machine has not joined a group ({path} is missing): run `molink join CODE`"
            ) from None
        except (ValueError, KeyError, TypeError) as e:  # BadAddress is a ValueError
            raise NotJoined(f"{path} is damaged ({type(e).__name__}); join again with a fresh code") from None


def _reply(msg: object, expected: str) -> dict:
    if not isinstance(msg, dict):
        raise Malformed("malformed pairing message")
    if msg.get("type") == "error":
        reason = msg.get("reason")
        raise refusal(
            msg.get("code"), f"the master refused: {reason if isinstance(reason, str) else 'no reason'}"[:300]
        )
    if msg.get("type") != expected:
        raise Malformed(f"unexpected pairing message (wanted {expected!r})")
    return msg


async def join(
    host: str, port: int, code: str, identity_name: str, identity_cert: str, timeout: float = 20.0
) -> JoinedGroup:
    """Run the joiner's side against ``host:port``; return the membership to save."""
    import asyncio

    import aiohttp

    from .identity import der_fingerprint, fingerprint

    nameplate, normalised = parse_code(code)
    session = PairingSession(normalised, master=False)
    url = f"wss://{format_address(host, port)}/v1/pair"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.ws_connect(
                url, ssl=_pairing_ssl(), server_hostname=PAIR_SNI, max_msg_size=1 << 20, heartbeat=None
            ) as ws,
        ):
            ssl_obj = ws.get_extra_info("ssl_object")
            seen = der_fingerprint(ssl_obj.getpeercert(binary_form=True)) if ssl_obj else ""
            await ws.send_json(
                {"type": "pake", "version": PAIRING_VERSION, "nameplate": nameplate, "pake": b64(session.outbound)}
            )
            msg = _reply(await ws.receive_json(timeout=timeout), "pake")
            session.finish(unb64(msg.get("pake")))
            if not session.check_peer_confirmation(unb64(msg.get("confirm"))):
                await ws.close()
                raise WrongCode("wrong pairing code (or someone is interfering)")
            sealed = session.seal({"name": identity_name, "cert": identity_cert})
            await ws.send_json({"type": "confirm", "confirm": b64(session.confirmation()), "sealed": sealed})
            welcome = session.open(_reply(await ws.receive_json(timeout=timeout), "welcome").get("sealed"))
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, TypeError, ValueError) as e:
        raise Unreachable(f"cannot pair with {host}:{port}: {type(e).__name__}: {e}"[:300]) from None
    from .identity import check_cert_pem

    try:
        cert = welcome.get("cert")
        if not isinstance(cert, str):
            raise ValueError("no certificate")
        master_cert = check_cert_pem(cert)
        group, name, relay = welcome["group"], welcome["name"], welcome.get("relay", "")
        if not isinstance(group, str) or not isinstance(name, str):
            raise ValueError("names must be strings")
        candidates = tuple(c.to_text() for c in parse_candidates(welcome.get("candidates", [])))
        if not isinstance(relay, str):
            raise ValueError("the relay must be HOST:PORT")
        if relay:
            from .bridge_wire import split_address

            split_address(relay)
    except (ValueError, KeyError) as e:
        raise Malformed(f"the master sent a malformed welcome: {e}") from None
    if fingerprint(master_cert) != seen:
        raise Impostor("the TLS certificate does not match the paired master (someone is interfering)")
    return JoinedGroup(
        group=group,
        name=name,
        master_host=host,
        master_port=port,
        master_cert=master_cert,
        candidates=candidates,
        relay=relay,
    )


def _pairing_ssl() -> ssl.SSLContext:
    from .identity import pairing_client_context

    return pairing_client_context()
