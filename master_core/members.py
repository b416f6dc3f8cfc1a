"""The group's members as the master keeps them: names and pinned certificates, on disk.

Contract
--------
``Members.open(data_dir, identity, group_name)`` loads ``group.json`` from ``data_dir``
(or starts an empty group named ``group_name``).  ``add(name, cert_pem)`` admits a paired
machine and returns its member name (the asked name, made unique in the group; a machine
that pairs again keeps its entry); ``remove(name)`` revokes one.  Every change is written
atomically at once and rebuilds ``tls_context``, the server context that accepts exactly the
current members' certificates: the group listener switches each new handshake to it, so a
removed member's next handshake fails.  ``member_for(fingerprint)`` names the member holding
a certificate, or None.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from worker_core.identity import Identity, fingerprint, server_context

log = logging.getLogger("molink.membership")

GROUP_FILE = "group.json"


@dataclass(frozen=True)
class Member:
    name: str
    fingerprint: str
    cert: str  # PEM
    joined: float  # unix seconds


class Members:
    def __init__(self, path: Path, identity: Identity, group: str, members: list[Member]) -> None:
        self.path = path
        self.identity = identity
        self.group = group
        self._members = {m.name: m for m in members}
        self.tls_context = self._context()

    @staticmethod
    def open(data_dir: Path, identity: Identity, group_name: str) -> Members:
        path = data_dir / GROUP_FILE
        if not path.exists():
            store = Members(path, identity, group_name, [])
            store._save()
            return store
        try:
            raw = json.loads(path.read_text())
            members = [
                Member(str(m["name"]), str(m["fingerprint"]), str(m["cert"]), float(m["joined"]))
                for m in raw["members"]
            ]
            return Members(path, identity, str(raw["group"]), members)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is damaged ({type(e).__name__}: {e}); move it away to start a new group"
            ) from None

    def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.joined)

    def member_for(self, fp: str) -> Member | None:
        return next((m for m in self._members.values() if m.fingerprint == fp), None)

    def add(self, asked: str, cert_pem: str) -> str:
        fp = fingerprint(cert_pem)
        known = self.member_for(fp)
        if known is not None:
            return known.name
        base = re.sub(r"[^A-Za-z0-9._-]", "-", asked.strip())[:48].strip("-") or "member"
        name, n = base, 2
        while name in self._members:
            name, n = f"{base}-{n}", n + 1
        self._members[name] = Member(name, fp, cert_pem, time.time())
        self._changed()
        log.info("member %s joined the group (certificate %s)", name, fp[:16])
        return name

    def remove(self, name: str) -> bool:
        if self._members.pop(name, None) is None:
            return False
        self._changed()
        log.warning("member %s removed: its certificate is no longer accepted", name)
        return True

    def _changed(self) -> None:
        self._save()
        self.tls_context = self._context()

    def _context(self) -> ssl.SSLContext:
        return server_context(self.identity, [m.cert for m in self._members.values()])

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"group": self.group, "members": [asdict(m) for m in self.members()]}, indent=2))
        tmp.replace(self.path)
