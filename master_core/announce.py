"""The master announces its group on the LAN by mDNS / DNS-SD, so a pairing code alone suffices.

Contract
--------
``Advertiser(port, group, host)``: ``await start()`` announces ``_molink._tcp.local.``
(:data:`worker_core.discovery.SERVICE`, where joiners browse) for this machine's group port
(TXT: the discovery version and the group name; never a code or a secret) with the bound
address, or every local address when bound to all; ``await stop()`` withdraws it.  Failure to
announce (no multicast) is logged, not raised: joiners can still give ``--master``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from worker_core.discovery import SERVICE, TXT_VERSION

log = logging.getLogger("molink.announce")

ALL_INTERFACES = ("0.0.0.0", "::", "")


class Advertiser:
    def __init__(self, port: int, group: str, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.group = group
        self._zc: Any = None  # zeroconf.asyncio.AsyncZeroconf while announced
        self._info: Any = None  # zeroconf.ServiceInfo while announced

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
                properties={"v": TXT_VERSION, "group": self.group[:60]},
                # One host name per announcement: two masters on one machine (or one on 127.0.0.1
                # beside one on every interface) must not pool their address records.
                server=f"{host.split('.')[0][:40]}-{self.port}-molink.local.",
                addresses=None,
                parsed_addresses=_local_addresses() if self.host in ALL_INTERFACES else [self.host],
            )
            await self._zc.async_register_service(self._info, allow_name_change=True)
            log.info("announced on the LAN by mDNS as %s", self._info.name)
        except Exception as e:  # no multicast route, no interfaces, a firewall ...
            log.warning(
                "cannot announce the group by mDNS (%s: %s); joiners must give --master HOST:PORT", type(e).__name__, e
            )
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
