"""Where the master's group port can be reached from: its candidates, and who can therefore join.

Contract
--------
``Reach(port, host, map_port=True)``: ``await start()`` lists the LAN addresses of the group
port (every local IPv4 address that is not loopback or link-local, when bound to all; else the
bound one) and its global IPv6 addresses (when the port listens on IPv6 too), and, with
``map_port``, asks the home router for a mapping (:class:`worker_core.portmap.PortMapper`): the
mapped external address is a candidate only once the router confirmed it and only when it is
public (a private or 100.64/10 "external" address means another NAT: nobody outside can dial
it).  With ``relay`` (``HOST:PORT`` of the relay the group registers at) the relay is a
candidate too (kind ``relay``, last: members race it after the direct ones; a relay candidate is
dialled by the group's fingerprint or the code's nameplate, never as the master itself).
``candidates()`` is the current list (LAN first); ``summary()`` says in one sentence who can join
and why; where the relay checked the mapped port from outside (``checked``, from
:class:`~worker_core.bridge_host.BridgeHost`), or a member's tunnel came from the internet to
the mapped address (``member_came``), the mapped candidate is ``verified`` when this master
answered there, and the summary says what the check found and who made it; ``await stop()`` removes the
mapping. A mapping that changes (renewal gave another port, the router restarted) changes
``candidates()`` at once. Loopback-bound masters (tests) map nothing and list only their address.

IPv6: where the group port listens on IPv6 (``::`` or a global IPv6 host) and ``map_port``, the
router is also asked for an inbound pinhole in its firewall (:class:`worker_core.portmap.pinhole.
Pinholer`, at the same time as the mapping).  The pinholed address is an ``ipv6`` candidate (in
place of the plain one of that address), ``verified`` once a member's tunnel dialled it and came
from a global IPv6 address outside this machine's /64 (``member_came`` with the ``peer``: the
pinhole then let someone in); ``summary()`` says it was opened or why not.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable

from worker_core.address import MemberPath, is_loopback
from worker_core.candidates import Candidate, Kind

log = logging.getLogger("molink.reach")

ALL = ("0.0.0.0", "::", "")


def local_addresses() -> tuple[list[str], list[str]]:
    """(IPv4 LAN addresses, global IPv6 addresses) of this machine."""
    import ifaddr

    v4: list[str] = []
    v6: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                addr = ipaddress.IPv4Address(ip.ip)
                if not addr.is_loopback and not addr.is_link_local:
                    v4.append(str(addr))
            else:
                addr6 = ipaddress.IPv6Address(ip.ip[0])
                if addr6.is_global:
                    v6.append(addr6.compressed)
    return v4, v6


class Reach:
    def __init__(self, port: int, host: str = "0.0.0.0", map_port: bool = True, relay: str = "") -> None:
        from worker_core.address import parse_address

        self.port = port
        self.relay = Candidate(Kind.RELAY, *parse_address(relay)) if relay else None
        self.host = host
        self.map_port = map_port and not is_loopback(host)
        self.mapper = None  # worker_core.portmap.PortMapper while mapping
        self.pinholer = None  # worker_core.portmap.pinhole.Pinholer while asking for an IPv6 pinhole
        self._lan: list[Candidate] = []
        self.failure = ""
        self._pinhole_checked: tuple[str, str] | None = None  # (member, address) it came in through
        self._check: tuple[int, bool, str, str] | None = None  # (port, reachable, why, checked by whom)

    async def start(self) -> None:
        if self.host in ALL:
            v4, v6 = await asyncio.to_thread(local_addresses)
            self._lan = [Candidate(Kind.LAN, a, self.port) for a in v4]
            if self.host == "::":
                self._lan += [Candidate(Kind.IPV6, a, self.port) for a in v6]
        else:
            kind = Kind.IPV6 if ":" in self.host and ipaddress.ip_address(self.host).is_global else Kind.LAN
            self._lan = [Candidate(kind, self.host, self.port)]
        if self.map_port:
            from worker_core.portmap import PortMapper
            from worker_core.portmap.pinhole import Pinholer

            self.mapper = PortMapper(self.port)
            starts: list[Awaitable[object]] = [self.mapper.start()]
            if self.host == "::" or (":" in self.host and ipaddress.ip_address(self.host).is_global):
                self.pinholer = Pinholer(self.port, address=None if self.host == "::" else self.host)
                starts.append(self.pinholer.start())
            await asyncio.gather(*starts)
            self.failure = self.mapper.failure

    async def stop(self) -> None:
        await asyncio.gather(*(k.stop() for k in (self.mapper, self.pinholer) if k is not None))

    def pinhole(self) -> Candidate | None:
        """The IPv6 address the router's firewall lets in to the group port, or None."""
        hole = self.pinholer.current if self.pinholer is not None else None
        if hole is None:
            return None
        verified = self._pinhole_checked is not None and self._pinhole_checked[1] == hole.host
        return Candidate(Kind.IPV6, hole.host, hole.port, verified=verified)

    def mapped_port(self) -> int:
        """The external port of a public mapping (0: none): what the relay is asked to check."""
        mapped = self.mapped()
        return mapped.port if mapped is not None else 0

    def checked(self, port: int, reachable: bool, why: str) -> None:
        """The relay dialled the mapped ``port`` from outside: whether this master answered."""
        relay = self.relay.address if self.relay is not None else "?"
        self._check = (port, reachable, why, f"relay {relay}")

    def member_came(self, dialled: str, member: str, path: MemberPath, peer: str = "") -> bool:
        """Member ``member``'s tunnel, which dialled ``dialled``, arrived along ``path`` (from
        ``peer``, when known): if it dialled the mapped address from the internet (not through
        this router's NAT loopback, which proves nothing), the mapping is checked from outside;
        if it dialled the pinholed IPv6 address from a global address outside this machine's /64
        (so through the router's firewall), the pinhole is.  True when that was news."""
        hole = self.pinhole()
        if hole is not None and path is MemberPath.IPV6 and dialled == hole.address and _outside(peer, hole.host):
            news = not hole.verified
            self._pinhole_checked = (member, hole.host)
            return news
        mapped = self.mapped()
        if mapped is None or path is not MemberPath.DIRECT or dialled != mapped.address:
            return False
        known = self._checked_now(mapped.port)
        self._check = (mapped.port, True, "", f"member {member}")
        return known is None or not known[0]

    def _checked_now(self, port: int) -> tuple[bool, str, str] | None:
        if self._check is None or self._check[0] != port:
            return None  # not checked, or an older mapping was
        return self._check[1], self._check[2], self._check[3]

    def mapped(self) -> Candidate | None:
        m = self.mapper.mapping if self.mapper is not None else None
        if m is None or not m.reachable:
            return None
        check = self._checked_now(m.external_port)
        return Candidate(Kind.MAPPED, m.external_host, m.external_port, verified=bool(check and check[0]))

    def candidates(self) -> list[Candidate]:
        mapped, hole = self.mapped(), self.pinhole()
        lan = [c for c in self._lan if hole is None or (c.host, c.port) != (hole.host, hole.port)]
        extra = [c for c in (hole, mapped, self.relay) if c is not None]
        return [*lan, *extra]

    def _pinhole_said(self, hole: Candidate | None) -> str:
        """What the IPv6 pinhole adds to the summary ("" when none was asked for)."""
        if hole is not None:
            checked = self._pinhole_checked
            by = f"; checked from outside by member {checked[0]}" if hole.verified and checked else ""
            return f"pinhole opened on your router for {hole.address}{by}"
        if self.pinholer is not None and self.pinholer.asked_for:  # (a machine without IPv6 asked nothing)
            return f"no IPv6 pinhole ({self.pinholer.failure or 'no answer'})"
        return ""

    def summary(self) -> str:
        mapped, hole = self.mapped(), self.pinhole()
        if mapped is not None:
            said = f"friends anywhere can join: port {mapped.port} mapped on your router ({mapped.address}"
            check = self._checked_now(mapped.port)
            if check is not None:
                ok, why, by = check
                said += (
                    f"; checked from outside by {by}" if ok else f"; but {by} could not reach it from outside: {why}"
                )
            six = self._pinhole_said(hole)
            return said + (f"; IPv6: {six}" if hole is not None else f"; {six}" if six else "") + ")"
        m = self.mapper.mapping if self.mapper is not None else None
        if m is not None:
            why = f"your router's own address {m.external_host} is behind another NAT (carrier-grade NAT?)"
        elif not self.map_port:
            why = "the group port is not mapped on a router (loopback or mapping off)"
        else:
            why = f"your router mapped no port ({self.failure or 'no answer'})"
        if hole is not None:
            others = f"; others through relay {self.relay.address}" if self.relay is not None else ""
            return f"friends anywhere with IPv6 can join: {self._pinhole_said(hole)} (no IPv4 way in: {why}{others})"
        if self.relay is not None:
            return f"friends anywhere can join through relay {self.relay.address} (no direct way in: {why})"
        return f"only this network can join, because {why}"


def _outside(peer: str, own: str) -> bool:
    """``peer`` is a global IPv6 address outside ``own``'s /64 (so it came through the router)."""
    try:
        ip = ipaddress.IPv6Address(peer.split("%")[0])
    except ValueError:
        return False
    return ip.is_global and ip not in ipaddress.IPv6Network(f"{own}/64", strict=False)
