"""Finding a group's master on the LAN by mDNS / DNS-SD, so a pairing code alone suffices.

Contract
--------
``await browse(seconds)`` listens that long for ``_molink._tcp.local.`` (``SERVICE``) and
returns every master found as ``(addresses, port, group)``, LAN IPv4 addresses first, loopback
last.  What mDNS says is only a hint: pairing then authenticates the master by the code, and
tunnels by its pinned certificate.  The master's side, the announcement, is
:mod:`master_core.announce`.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("molink.discovery")

SERVICE = "_molink._tcp.local."
TXT_VERSION = "1"  # the "v" entry of an announcement's TXT record


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
            group = ((info.properties or {}).get(b"group") or b"").decode("utf-8", "replace")
            addrs = sorted(info.parsed_addresses(), key=_preference)
            if addrs and info.port:
                found.append((addrs, int(info.port), group))
    finally:
        await zc.async_close()
    return found
