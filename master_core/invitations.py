"""Open pairing invitations: which codes exist, and the rules that retire them.

Contract (pure: time is passed in, nothing is stored on disk)
--------
``Invitations.issue(now)`` makes a code (see ``worker_core.pairing``) on a free nameplate, or
raises :class:`TooManyCodes`.  A pairing attempt calls ``begin(nameplate, now)``, which returns
the code to run SPAKE2 with and counts the attempt, or raises the pairing error that says why
(safe to show the joiner): :class:`~worker_core.pairing.UnknownCode` for no such code,
:class:`~worker_core.pairing.Refused` for a code expired (``TTL`` seconds after issue), used, or
burned (``MAX_FAILURES`` attempts failed).  The
attempt then ends with ``succeed`` (the code is used: single use) or ``fail``; an attempt that
never ends (the joiner vanished) counts as failed, because it was counted when it began.
State of each invitation: ``OPEN -> USED | EXPIRED | BURNED``; retired ones stay known for
a while so a late joiner hears the real reason.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum

from worker_core.pairing import Refused, UnknownCode, make_code

TTL = 300.0  # seconds a code stays valid
MAX_FAILURES = 5  # attempts that may fail before the code is burned
_KEEP_RETIRED = 3600.0  # seconds a retired code's reason is remembered


class InvitationState(Enum):
    OPEN = "open"
    USED = "used"
    EXPIRED = "expired"
    BURNED = "burned"


class TooManyCodes(Exception):
    """Every nameplate has an open or recently retired code; the message is for the admin."""


@dataclass
class Invitation:
    nameplate: str
    code: str
    issued: float  # seconds, caller's clock
    attempts: int = 0  # begun; each counts as a failure until it succeeds
    state: InvitationState = InvitationState.OPEN


class Invitations:
    def __init__(self) -> None:
        self._by_nameplate: dict[str, Invitation] = {}

    def _tick(self, now: float) -> None:
        for nameplate, inv in list(self._by_nameplate.items()):
            if inv.state is InvitationState.OPEN and now - inv.issued > TTL:
                inv.state = InvitationState.EXPIRED
            if inv.state is not InvitationState.OPEN and now - inv.issued > _KEEP_RETIRED:
                del self._by_nameplate[nameplate]

    def issue(self, now: float) -> str:
        self._tick(now)
        free = [n for n in range(10, 100) if str(n) not in self._by_nameplate]
        if not free:
            raise TooManyCodes("too many pairing codes at once; wait for some to expire")
        nameplate = secrets.choice(free)
        inv = Invitation(str(nameplate), make_code(nameplate), now)
        self._by_nameplate[inv.nameplate] = inv
        return inv.code

    def begin(self, nameplate: str, now: float) -> str:
        self._tick(now)
        inv = self._by_nameplate.get(nameplate)
        if inv is None:
            raise UnknownCode("no such pairing code on this master")
        if inv.state is InvitationState.OPEN and inv.attempts >= MAX_FAILURES:
            inv.state = InvitationState.BURNED
        if inv.state is not InvitationState.OPEN:
            reason = {
                InvitationState.USED: "this pairing code was already used",
                InvitationState.EXPIRED: "this pairing code has expired",
                InvitationState.BURNED: f"this pairing code is burned after {MAX_FAILURES} failed attempts",
            }[inv.state]
            raise Refused(f"{reason}; ask for a new one (`molink group code`)")
        inv.attempts += 1
        return inv.code

    def succeed(self, nameplate: str) -> None:
        inv = self._by_nameplate.get(nameplate)
        if inv is not None:
            inv.state = InvitationState.USED

    def fail(self, nameplate: str) -> None:
        inv = self._by_nameplate.get(nameplate)
        if inv is not None and inv.state is InvitationState.OPEN and inv.attempts >= MAX_FAILURES:
            inv.state = InvitationState.BURNED

    def nameplates(self) -> list[str]:
        """Every nameplate known (open, or retired but remembered): a relay routes them here."""
        return list(self._by_nameplate)

    def state(self, nameplate: str) -> InvitationState | None:
        inv = self._by_nameplate.get(nameplate)
        return inv.state if inv else None
