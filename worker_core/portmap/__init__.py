"""Port mapping on the home router: UPnP IGD, NAT-PMP and PCP tried together; renewed; removed on stop.

Contract
--------
``PortMapper(internal_port)``: ``await start()`` asks the router for a TCP mapping of
``internal_port`` by all three protocols at once (PCP MAP, a NAT-PMP external address probe,
an SSDP search for a UPnP IGD; each bounded by a few seconds) and keeps the first that works,
in the order PCP, NAT-PMP, UPnP (the others are left alone: at most one mapping is made).  It
returns the :class:`Mapping` (the external address and port the router confirmed, the lease
and the protocol) or None; ``failure`` then says why in one line per protocol.  A mapping whose
external address is not public (private, 100.64.0.0/10 carrier space, ...) means another NAT
sits behind the router: ``Mapping.reachable`` is False and it must not be offered as a
candidate.  Renewal at half the lease, mapping again when it fails, ``on_change(mapping |
None)`` and the bounded ``await stop()`` are :class:`~worker_core.portmap.lease.Keeper`'s;
``mapping`` is the current one.  IPv6 pinholes (the firewall, not the NAT) are
:class:`~worker_core.portmap.pinhole.Pinholer`, the same shape.

The protocols are :mod:`.pcp`, :mod:`.natpmp` and :mod:`.upnp`; their failures are
:mod:`.errors`.  ``gateway`` (default: the default route's) and ``udp_port`` (5351) are for
tests, as is ``protocols`` (a subset of ``("pcp", "nat-pmp", "upnp")``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import natpmp, pcp
from .errors import NoAnswer, PortMapError
from .gateway import default_gateway, local_address
from .lease import Keeper

if TYPE_CHECKING:
    from .upnp import Igd

log = logging.getLogger("molink.portmap")

LEASE = 3600  # seconds asked for; renewed at half
PROTOCOLS = ("pcp", "nat-pmp", "upnp")


@dataclass(frozen=True)
class Mapping:
    protocol: str  # pcp | nat-pmp | upnp
    internal_port: int
    external_host: str
    external_port: int
    lifetime: int  # seconds granted; 0: permanent

    @property
    def reachable(self) -> bool:
        """The external address is on the internet (not another NAT's inside)."""
        from ..candidates import is_public

        return is_public(self.external_host)

    def describe(self) -> str:
        return f"{self.external_host}:{self.external_port} -> :{self.internal_port} by {self.protocol}" + (
            f", {self.lifetime} s lease" if self.lifetime else ", permanent"
        )


class PortMapper(Keeper[Mapping]):
    what = "port mapping"

    def __init__(
        self,
        internal_port: int,
        gateway: str | None = None,
        on_change: Callable[[Mapping | None], object] | None = None,
        udp_port: int = natpmp.PORT,
        protocols: tuple[str, ...] = PROTOCOLS,
        lease: int = LEASE,
        upnp_timeout: int = 2,
    ) -> None:
        super().__init__(internal_port, on_change, protocols, lease, udp_port, upnp_timeout)
        self.gateway = gateway
        self._igd: Igd | None = None  # while mapped by UPnP
        self._client = ""  # this host's LAN address, as the router sees it

    @property
    def mapping(self) -> Mapping | None:
        return self.current

    def _made(self, lease: Mapping) -> None:
        if not lease.reachable:
            log.warning(
                "the router's external address %s is not public: another NAT is in front of it "
                "(carrier-grade NAT?); friends outside cannot dial it",
                lease.external_host,
            )

    # ------------------------------------------------------------------ mapping

    async def _make(self, previous: Mapping | None) -> Mapping | None:
        gateway = self.gateway or await asyncio.to_thread(default_gateway)
        if gateway is None:
            self.failure = "no default gateway (no router to ask)"
            return None
        self._client = local_address(gateway) or ""
        external = previous.external_port if previous is not None else self.internal_port
        probes = {
            "pcp": self._pcp(gateway, external),
            "nat-pmp": self._natpmp_probe(gateway),
            "upnp": self._upnp_find(),
        }

        async def make(name: str, got: object) -> Mapping:
            if isinstance(got, Mapping):  # PCP answers with the mapping itself
                return got
            if name == "nat-pmp":
                lease = await natpmp.map_tcp(gateway, self.internal_port, external, self.lease, port=self.udp_port)
                return Mapping("nat-pmp", self.internal_port, str(got), lease.external_port, lease.lifetime)
            return await self._upnp_map(got, external)

        return await self._first(PROTOCOLS, probes, make)

    async def _pcp(self, gateway: str, external: int) -> Mapping:
        if not self._client:
            raise NoAnswer("no local address towards the gateway")
        lease = await pcp.map_tcp(
            gateway, self._client, self.internal_port, external, self.lease, self._nonce, port=self.udp_port
        )
        return Mapping("pcp", self.internal_port, lease.external_host, lease.external_port, lease.lifetime)

    async def _natpmp_probe(self, gateway: str) -> str:
        return await natpmp.external_address(gateway, port=self.udp_port)

    async def _upnp_find(self) -> object:
        from .upnp import Igd, find_igd

        return await Igd.open(await find_igd(self.upnp_timeout, self._client or None))

    async def _upnp_map(self, igd: object, external: int) -> Mapping:
        from .upnp import Igd

        assert isinstance(igd, Igd)  # noqa: S101 - what _upnp_find returns
        host = await igd.external_address()
        port, lease = await igd.add(self._client, self.internal_port, external, self.lease)
        self._igd = igd
        return Mapping("upnp", self.internal_port, host, port, lease)

    async def _renew(self, m: Mapping) -> Mapping:
        gateway = self.gateway or await asyncio.to_thread(default_gateway) or ""
        if m.protocol == "pcp":
            return await self._pcp(gateway, m.external_port)
        if m.protocol == "nat-pmp":
            host = await natpmp.external_address(gateway, port=self.udp_port)
            lease = await natpmp.map_tcp(gateway, self.internal_port, m.external_port, self.lease, port=self.udp_port)
            return Mapping("nat-pmp", self.internal_port, host, lease.external_port, lease.lifetime)
        if self._igd is None:
            raise PortMapError("UPnP: the router is gone")
        return await self._upnp_map(self._igd, m.external_port)

    async def _remove(self, m: Mapping) -> None:
        gateway = self.gateway or await asyncio.to_thread(default_gateway) or ""
        if m.protocol == "pcp":
            await pcp.map_tcp(gateway, self._client, self.internal_port, 0, 0, self._nonce, port=self.udp_port, tries=2)
        elif m.protocol == "nat-pmp":
            await natpmp.map_tcp(gateway, self.internal_port, 0, 0, port=self.udp_port, tries=2)
        elif self._igd is not None:
            await self._igd.delete(m.external_port)
