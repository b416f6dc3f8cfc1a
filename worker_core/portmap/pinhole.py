"""IPv6 pinholes in the home router's firewall: UPnP IGDv2 and PCP tried together; renewed; removed on stop.

Contract
--------
A machine with a global IPv6 address needs no NAT mapping, but a home router's stateful
firewall drops unsolicited inbound IPv6.  ``Pinholer(internal_port)``: ``await start()`` takes
this machine's global IPv6 address (the one it sends from towards the internet: both protocols
open a pinhole only for the address that asks, so every request leaves from it) and asks the
router for an inbound pinhole to ``[address]:internal_port`` (TCP, any remote host and port).
Both protocols are probed at once, each bounded by a few seconds, and nothing is opened by a
probe: an SSDP search over IPv6 for an IGDv2 whose ``WANIPv6FirewallControl`` allows inbound
pinholes, and a PCP ANNOUNCE to the IPv6 default router.  Then the first that answered, in the
order UPnP, PCP, opens the one pinhole (AddPinhole; PCP MAP with the IPv6 address, RFC 6887
§11).  UPnP comes first because its pinhole has a UniqueID to renew and delete by; PCP finds
its pinhole again by the nonce, which miniupnpd 2.3.1 keeps in a rule description it drops
when it renews, after which it refuses the delete (NOT_AUTHORIZED) and the pinhole lasts until
its lease ends (logged, not raised).  ``start`` returns the :class:`Pinhole` (address, port,
lease, protocol) or None; ``failure`` says why in one clause per protocol (no global address,
no router found, 606, 702, 703, a PCP result code ...).  Renewal (UpdatePinhole; PCP: the same
MAP again) at half the lease, opening again when it fails, ``on_change`` and the bounded
``stop()`` (DeletePinhole; PCP MAP with lifetime 0) are :class:`~worker_core.portmap.lease.Keeper`'s.

``address`` (default: found), ``gateway`` (the PCP server; default: the IPv6 default route's
next hop), ``location`` (the IGD's description URL: no SSDP search), ``udp_port`` and
``protocols`` (a subset of ``("upnp", "pcp")``) are for tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import pcp
from .errors import NoAnswer, PortMapError, Refused
from .gateway import default_gateway6, local_address
from .lease import Keeper

if TYPE_CHECKING:
    from .upnp import Firewall

log = logging.getLogger("molink.portmap")

LEASE = 3600  # seconds asked for; renewed at half (IGDv2 allows 1..86400)
PROTOCOLS = ("upnp", "pcp")
ANY_GLOBAL = "2000::1"  # a global unicast address: only the route to it is looked up, nothing is sent


@dataclass(frozen=True)
class Pinhole:
    protocol: str  # upnp | pcp
    host: str  # this machine's global IPv6 address the pinhole lets in
    port: int
    lifetime: int  # seconds granted
    uid: int = -1  # the UPnP pinhole's UniqueID (-1: PCP)

    def describe(self) -> str:
        return f"[{self.host}]:{self.port} by {self.protocol}, {self.lifetime} s lease"


def global_address() -> tuple[str, int] | None:
    """(this machine's global IPv6 source address towards the internet, its interface index), or None."""
    own = local_address(ANY_GLOBAL)
    if own is None:
        return None
    try:
        ip = ipaddress.IPv6Address(own.split("%")[0])
    except ValueError:
        return None
    if not ip.is_global:
        return None
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for a in adapter.ips:
            if not isinstance(a.ip, str) and ipaddress.IPv6Address(a.ip[0]) == ip:
                return ip.compressed, int(adapter.index or 0)
    return ip.compressed, 0


class Pinholer(Keeper[Pinhole]):
    what = "IPv6 pinhole"

    def __init__(
        self,
        internal_port: int,
        on_change: Callable[[Pinhole | None], object] | None = None,
        address: str | None = None,
        gateway: str | None = None,
        location: str | None = None,
        udp_port: int = pcp.PORT,
        protocols: tuple[str, ...] = PROTOCOLS,
        lease: int = LEASE,
        upnp_timeout: int = 2,
    ) -> None:
        super().__init__(internal_port, on_change, protocols, lease, udp_port, upnp_timeout)
        self.address = address
        self.gateway = gateway
        self.location = location
        self._firewall: Firewall | None = None  # while opened by UPnP
        self._client = ""  # the address asked for, and the PCP server asked, when opened
        self._router = ""

    @property
    def asked_for(self) -> str:
        """The global IPv6 address the last attempt asked a pinhole for ("": none, this machine has none)."""
        return self._client

    # ------------------------------------------------------------------ opening

    async def _make(self, previous: Pinhole | None) -> Pinhole | None:
        found = (self.address, 0) if self.address else await asyncio.to_thread(global_address)
        if found is None:
            self.failure = "this machine has no global IPv6 address (nothing to open)"
            self._client = ""
            return None
        address, scope = found
        gateway = self.gateway
        if gateway is None:
            route = await asyncio.to_thread(default_gateway6)
            gateway, scope = (route[0], route[1]) if route else ("", scope)
        self._client, self._router = address, gateway
        probes = {"upnp": self._upnp_find(address, scope), "pcp": self._pcp_probe(gateway, address)}

        async def make(name: str, got: object) -> Pinhole:
            return await (self._upnp_open(got, address) if name == "upnp" else self._pcp_open(gateway, address))

        return await self._first(PROTOCOLS, probes, make)

    async def _upnp_find(self, address: str, scope: int) -> Firewall:
        from .upnp import Firewall, find_igd

        location = self.location or await find_igd(self.upnp_timeout, address, scope)
        firewall = await Firewall.open(location, address)
        await firewall.check()
        return firewall

    async def _upnp_open(self, firewall: object, address: str) -> Pinhole:
        from .upnp import Firewall

        assert isinstance(firewall, Firewall)  # noqa: S101 - what _upnp_find returns
        uid = await firewall.add(address, self.internal_port, self.lease)
        self._firewall = firewall
        return Pinhole("upnp", address, self.internal_port, self.lease, uid)

    async def _pcp_probe(self, gateway: str, address: str) -> None:
        if not gateway:
            raise NoAnswer("PCP: no IPv6 default router to ask")
        await pcp.announce(gateway, address, port=self.udp_port, source=_source(address, gateway))

    async def _pcp_open(self, gateway: str, address: str, lifetime: int | None = None, tries: int = 3) -> Pinhole:
        lease = await pcp.map_tcp(
            gateway, address, self.internal_port, self.internal_port, self.lease if lifetime is None else lifetime,
            self._nonce, port=self.udp_port, tries=tries, source=_source(address, gateway),
        )  # fmt: skip
        if lifetime == 0:
            return Pinhole("pcp", address, self.internal_port, 0)
        if lease.external_host != address or lease.external_port != self.internal_port:
            # a router that translates IPv6 (NPTv6) answers another address: that is what outside dials
            log.info("the router opened [%s]:%d for [%s]:%d", lease.external_host, lease.external_port, address,
                     self.internal_port)  # fmt: skip
        return Pinhole("pcp", lease.external_host, lease.external_port, lease.lifetime)

    # ------------------------------------------------------------------ keeping

    async def _renew(self, hole: Pinhole) -> Pinhole:
        if hole.protocol == "upnp":
            if self._firewall is None:
                raise PortMapError("UPnP: the router is gone")
            await self._firewall.update(hole.uid, self.lease)
            return hole
        return await self._pcp_open(self._router, self._client)

    async def _remove(self, hole: Pinhole) -> None:
        if hole.protocol == "upnp":
            if self._firewall is not None:
                await self._firewall.delete(hole.uid)
            return
        try:
            await self._pcp_open(self._router, self._client, lifetime=0, tries=2)
        except Refused as e:
            if e.code != 2:  # NOT_AUTHORIZED
                raise
            raise Refused(
                f"{e} (a router that lost the pinhole's nonce, as miniupnpd 2.3.1 does after a renewal; "
                f"it closes when its lease ends, in at most {hole.lifetime} s)",
                e.code,
            ) from None


def _source(address: str, gateway: str) -> str | None:
    """Where a request to ``gateway`` leaves from: ``address`` itself (a link-local router would
    otherwise see the link-local source and refuse: ADDRESS_MISMATCH); None for a test's IPv4
    loopback router."""
    try:
        six = ipaddress.ip_address(gateway.split("%")[0]).version == 6
    except ValueError:
        return None
    return address if six else None
