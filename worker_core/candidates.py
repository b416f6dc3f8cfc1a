"""Where a listener can be reached (candidates), and racing them (happy eyeballs).

Contract
--------
A :class:`Candidate` is one way to reach a listener: ``kind`` (:class:`Kind`: ``lan``, ``mapped``
(a port mapped on the home router, confirmed by it), ``ipv6`` (a global IPv6 address) or
``relay``), ``host``, ``port`` and ``verified`` (someone outside dialled back through it).
Candidates travel as JSON objects (:meth:`Candidate.to_json` / :func:`parse_candidates`, which
checks every field and drops none silently: a bad one raises ``ValueError``) and in a join link
as text (``kind~host:port`` or ``kind~host:port~v``, comma separated: :meth:`to_text` /
:func:`parse_candidate_text`).

``await race(candidates, dial, ...)`` tries them in preference order (LAN, then direct (IPv6,
mapped), then relay; verified before unverified), starting the next one ``stagger`` seconds
after the previous (at once when it fails), each bounded by ``timeout``.  A relay candidate waits
longer: ``relay_delay`` seconds after the last start, or until no direct dial is left running
(all failed), so a direct path that answers within ``relay_delay`` wins over a relay that might
answer sooner (the relay costs its uplink twice and a copy).  It returns
``(candidate, result)`` of the first ``dial`` that succeeds (a fingerprint check belongs in
``dial``: a TLS handshake that pins the peer), cancels the rest and hands every other success
to ``discard`` (close it), or raises :class:`NoPath` listing why each failed.  ``dial(candidate)``
for a ``relay`` candidate is whatever the caller supplies (the relay's splice); this module only
orders and races.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .address import BadAddress, check_host, format_address, parse_address

MAX_CANDIDATES = 16
STAGGER = 0.25  # seconds between starting two dials (RFC 8305 suggests 250 ms)
DIAL_TIMEOUT = 5.0  # seconds one candidate may take for TCP and TLS
RELAY_DELAY = 1.0  # seconds a relay candidate waits for the direct ones (unless they all failed first)


class Kind(enum.Enum):
    LAN = "lan"
    IPV6 = "ipv6"
    MAPPED = "mapped"
    RELAY = "relay"


PREFERENCE = {Kind.LAN: 0, Kind.IPV6: 1, Kind.MAPPED: 1, Kind.RELAY: 2}  # lower first


@dataclass(frozen=True)
class Candidate:
    kind: Kind
    host: str
    port: int
    verified: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", check_host(self.host))
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise BadAddress(f"port {self.port!r} out of range")

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "host": self.host, "port": self.port, "verified": self.verified}

    def to_text(self) -> str:
        return f"{self.kind.value}~{self.address}" + ("~v" if self.verified else "")

    def sort_key(self) -> tuple[int, int]:
        return (PREFERENCE[self.kind], 0 if self.verified else 1)


def from_json(obj: object) -> Candidate:
    if not isinstance(obj, dict):
        raise ValueError("a candidate is an object")
    try:
        kind = Kind(obj.get("kind"))
    except ValueError:
        raise ValueError(f"unknown candidate kind {obj.get('kind')!r}") from None
    host, port, verified = obj.get("host"), obj.get("port"), obj.get("verified", False)
    if not isinstance(host, str) or type(port) is not int or type(verified) is not bool:
        raise ValueError("a candidate has a host (text), a port (integer) and verified (true/false)")
    return Candidate(kind, host, port, verified)


def parse_candidates(value: object) -> list[Candidate]:
    if not isinstance(value, list) or len(value) > MAX_CANDIDATES:
        raise ValueError(f"candidates must be a list of at most {MAX_CANDIDATES}")
    return [from_json(v) for v in value]


def parse_candidate_text(text: str) -> list[Candidate]:
    """The candidates of a join link's ``via`` parameter."""
    out = []
    parts = [p for p in text.split(",") if p]
    if len(parts) > MAX_CANDIDATES:
        raise ValueError(f"at most {MAX_CANDIDATES} candidates")
    for part in parts:
        kind, sep, rest = part.partition("~")
        if not sep:
            raise ValueError(f"a candidate looks like lan~192.168.1.20:7733, not {part[:80]!r}")
        address, _, flag = rest.partition("~")
        if flag not in ("", "v"):
            raise ValueError(f"unknown candidate flag {flag[:10]!r}")
        try:
            k = Kind(kind)
        except ValueError:
            raise ValueError(f"unknown candidate kind {kind[:20]!r}") from None
        host, port = parse_address(address)
        out.append(Candidate(k, host, port, flag == "v"))
    return out


def ordered(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Preference order, duplicates (same host and port) removed."""
    seen: set[tuple[str, int]] = set()
    out = []
    for c in sorted(candidates, key=Candidate.sort_key):
        if (c.host, c.port) not in seen:
            seen.add((c.host, c.port))
            out.append(c)
    return out


def is_public(host: str) -> bool:
    """False for an address behind another NAT or not routed on the internet (private, 100.64/10, ...)."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_global
    except ValueError:
        return False


class NoPath(Exception):
    """No candidate could be dialled; the message lists each one's failure."""


T = TypeVar("T")


async def race(
    candidates: Sequence[Candidate],
    dial: Callable[[Candidate], Awaitable[T]],
    discard: Callable[[T], object] | None = None,
    stagger: float = STAGGER,
    timeout: float = DIAL_TIMEOUT,
    relay_delay: float = RELAY_DELAY,
) -> tuple[Candidate, T]:
    order = ordered(candidates)
    if not order:
        raise NoPath("no address to try")
    loop = asyncio.get_running_loop()
    failures: list[str] = []
    running: dict[asyncio.Task, Candidate] = {}
    winner: tuple[Candidate, T] | None = None
    pending = list(order)
    last_start = -float("inf")
    failed = False  # a dial failed since the last start: the next direct one starts at once

    def gap(c: Candidate) -> float:
        return relay_delay if c.kind is Kind.RELAY else stagger

    try:
        while pending or running:
            if pending:
                nxt = pending[0]
                now = loop.time()
                if not running or now - last_start >= gap(nxt) or (failed and nxt.kind is not Kind.RELAY):
                    pending.pop(0)
                    running[asyncio.ensure_future(asyncio.wait_for(dial(nxt), timeout))] = nxt
                    last_start, failed = now, False
            wait = max(0.0, last_start + gap(pending[0]) - loop.time()) if pending else None
            done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                c = running.pop(task)
                exc = task.exception()
                if exc is None:
                    if winner is None:
                        winner = (c, task.result())
                    elif discard is not None:
                        discard(task.result())
                else:
                    failed = True
                    failures.append(f"{c.kind.value} {c.address}: {type(exc).__name__} {exc}"[:200])
            if winner is not None:
                return winner
    finally:
        for task in running:
            task.cancel()
        for task in list(running):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                result = await task
                if discard is not None:
                    discard(result)
    raise NoPath("no address answered: " + "; ".join(failures))
