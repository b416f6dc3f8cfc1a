"""Finding a group's master on the LAN by mDNS / DNS-SD, so a pairing code alone suffices.

Contract
--------
``Advertiser(port, group, host)``: ``await start()`` announces ``_molink._tcp.local.`` for
this machine's group port (TXT: protocol version, group name; never a code or a secret) with
the bound address, or every local address when bound to all; ``await stop()`` withdraws it.  Failure to announce (no multicast) is logged, not
raised: joiners can still give ``--master``.

``await browse(seconds)`` listens that long and returns every master found as
``(addresses, port, group)``, LAN IPv4 addresses first, loopback last.  What mDNS says is only a hint: pairing then
authenticates the master by the code, and tunnels by its pinned certificate.
"""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger("molink.discovery")

SERVICE = "_molink._tcp.local."


class Advertiser:
    def __init__(self, port: int, group: str, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.group = group
        self._zc = None
        self._info = None

    async def start(self) -> None:
        try:
            from zeroconf import ServiceInfo
            from zeroconf.asyncio import AsyncZeroconf

            host = socket.gethostname()
            label = f"{self.group or host}-{self.port}"[:60].replace(".", "-")
            self._zc = AsyncZeroconf()
            self._info = ServiceInfo(
                SERVICE,
                f"{label}.{SERVICE}",
                port=self.port,
                properties={"v": "1", "group": self.group[:60]},
                server=f"{host.split('.')[0]}-molink.local.",
                addresses=None,
                parsed_addresses=_local_addresses() if self.host in ("0.0.0.0", "::", "") else [self.host],
            )
            await self._zc.async_register_service(self._info, allow_name_change=True)
            log.info("announced on the LAN by mDNS as %s", self._info.name)
        except Exception as e:  # no multicast route, no interfaces, a firewall ...
            log.warning("cannot announce the group by mDNS (%s: %s); joiners must give --master HOST:PORT", type(e).__name__, e)
            await self.stop()

    async def stop(self) -> None:
        zc, info, self._zc, self._info = self._zc, self._info, None, None
        if zc is None:
            return
        try:
            if info is not None:
                await zc.async_unregister_service(info)
        finally:
            await zc.async_close()


def _local_addresses() -> list[str]:
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.append(ip.ip)
    return out or ["127.0.0.1"]


def _preference(address: str) -> tuple[int, str]:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (2 if ip.is_loopback else 1 if (ip.version == 6 or ip.is_link_local) else 0, address)


async def browse(seconds: float = 3.0) -> list[tuple[list[str], int, str]]:
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    names: set[str] = set()

    def on_change(zeroconf, service_type, name, state_change) -> None:  # noqa: ANN001 - zeroconf's callback signature
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.add(name)

    zc = AsyncZeroconf()
    found: list[tuple[list[str], int, str]] = []
    try:
        browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE], handlers=[on_change])
        await asyncio.sleep(seconds)
        await browser.async_cancel()
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE, name)
            if not await info.async_request(zc.zeroconf, 1500):
                continue
            group = (info.properties or {}).get(b"group", b"").decode("utf-8", "replace")
            addrs = sorted(info.parsed_addresses(), key=_preference)
            if addrs and info.port:
                found.append((addrs, int(info.port), group))
    finally:
        await zc.async_close()
    return found
