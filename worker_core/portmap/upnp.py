"""UPnP IGD (v1 and v2) port mapping, through ``async-upnp-client``.

Contract
--------
``await find_igd(timeout)`` -> the description URL of the first Internet Gateway Device that
answers an SSDP search, or raises :class:`~worker_core.portmap.errors.NoAnswer`.
``await Igd.open(url)`` reads its description and picks its connection service
(``WANIPConnection:2``, then ``:1``, then ``WANPPPConnection:1``).  On it:

* ``external_address()`` -> ``GetExternalIPAddress`` (an empty or non-IPv4 answer is
  :class:`~worker_core.portmap.errors.Nonsense`);
* ``add(client, internal_port, external_port, lease)`` -> ``(external port, lease granted)``:
  ``AddPortMapping`` (on IGDv2 too); error 718 (ConflictInMappingEntry) tries another external
  port (at most ``CONFLICT_TRIES``), 725
  (OnlyPermanentLeasesSupported) asks again with lease 0 (permanent: the caller still removes
  it on stop);
* ``delete(external_port)`` -> ``DeletePortMapping``.

UPnP error codes become :class:`~worker_core.portmap.errors.Refused` (``code`` kept), transport
failures :class:`~worker_core.portmap.errors.NoAnswer`, broken XML or answers
:class:`~worker_core.portmap.errors.Nonsense`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from typing import Any

from .errors import NoAnswer, Nonsense, PortMapError, Refused

DEVICES = ("urn:schemas-upnp-org:device:InternetGatewayDevice:2", "urn:schemas-upnp-org:device:InternetGatewayDevice:1")
SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
CONFLICT, ONLY_PERMANENT = 718, 725
CONFLICT_TRIES = 4
REQUEST_TIMEOUT = 5  # seconds for one HTTP request to the router


def _translate(e: BaseException, what: str) -> PortMapError:
    from async_upnp_client.exceptions import UpnpActionError, UpnpCommunicationError, UpnpContentError, UpnpError

    if isinstance(e, UpnpActionError) and e.error_code is not None:
        return Refused(f"UPnP: {what}: the router answered error {e.error_code} ({e.error_desc or 'no text'})",
                       int(e.error_code))  # fmt: skip
    if isinstance(e, (UpnpCommunicationError, OSError, asyncio.TimeoutError)):
        return NoAnswer(f"UPnP: {what}: {type(e).__name__} {e}"[:300])
    if isinstance(e, (UpnpContentError, UpnpError, ValueError, KeyError, TypeError)):
        return Nonsense(f"UPnP: {what}: the router's answer makes no sense ({type(e).__name__} {e})"[:300])
    return PortMapError(f"UPnP: {what}: {type(e).__name__} {e}"[:300])


async def find_igd(timeout: int = 2, source: str | None = None) -> str:
    from async_upnp_client.search import async_search

    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_response(headers: Any) -> None:
        if headers.get("st") in DEVICES and headers.get("location") and not found.done():
            found.set_result(str(headers["location"]))

    async def search(target: str) -> None:
        await async_search(on_response, timeout=timeout, search_target=target, source=(source, 0) if source else None)

    searches = asyncio.gather(*(search(t) for t in DEVICES), return_exceptions=True)
    try:
        await asyncio.wait([found, searches], timeout=timeout + 1, return_when=asyncio.FIRST_COMPLETED)
        if found.done():
            return found.result()
    finally:
        searches.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await searches
        if not found.done():
            found.cancel()
    raise NoAnswer("UPnP: no Internet Gateway Device answered the search")


class Igd:
    def __init__(self, service: Any, location: str, version: int) -> None:
        self.service = service
        self.location = location
        self.version = version  # 1 or 2 (the connection service's)

    @classmethod
    async def open(cls, location: str) -> Igd:
        from async_upnp_client.aiohttp import AiohttpRequester
        from async_upnp_client.client_factory import UpnpFactory

        try:
            device = await UpnpFactory(AiohttpRequester(timeout=REQUEST_TIMEOUT), non_strict=True).async_create_device(
                location
            )
        except Exception as e:  # noqa: BLE001 - every failure of the library becomes one of ours
            raise _translate(e, "reading the router's description") from None
        for name in SERVICES:
            service = device.find_service(name)
            if service is not None:
                return cls(service, location, 2 if name.endswith(":2") else 1)
        raise Nonsense("UPnP: the gateway offers no WANIPConnection or WANPPPConnection service")

    async def _call(self, action: str, what: str, **args: Any) -> Any:
        try:
            return await self.service.action(action).async_call(**args)
        except KeyError:
            raise Nonsense(f"UPnP: the router has no {action} action") from None
        except Exception as e:  # noqa: BLE001
            raise _translate(e, what) from None

    async def external_address(self) -> str:
        answer = await self._call("GetExternalIPAddress", "asking the external address")
        value = answer.get("NewExternalIPAddress") if isinstance(answer, dict) or hasattr(answer, "get") else None
        try:
            return str(ipaddress.IPv4Address(str(value or "")))
        except ValueError:
            raise Nonsense(f"UPnP: the router says its external address is {str(value)[:60]!r}") from None

    async def add(self, client: str, internal_port: int, external_port: int, lease: int) -> tuple[int, int]:
        # AddPortMapping on IGDv1 and v2 alike: AddAnyPortMapping's answer is unreliable in the
        # field (miniupnpd 2.3.1 names its out argument NewExternalPort, so no reserved port comes back)
        port = external_port
        for _ in range(CONFLICT_TRIES):
            try:
                await self._add(client, internal_port, port, lease)
                return port, lease
            except Refused as e:
                if e.code == ONLY_PERMANENT and lease:
                    lease = 0
                    continue
                if e.code != CONFLICT:
                    raise
                port = random.randint(20000, 60000)  # noqa: S311 - a port, not a secret
        raise Refused(f"UPnP: every external port tried is taken ({CONFLICT_TRIES} tries)", CONFLICT)

    def _args(self, client: str, internal_port: int, external_port: int, lease: int) -> dict[str, Any]:
        return {
            "NewRemoteHost": "",
            "NewExternalPort": external_port,
            "NewProtocol": "TCP",
            "NewInternalPort": internal_port,
            "NewInternalClient": client,
            "NewEnabled": True,
            "NewPortMappingDescription": "MoLink",
            "NewLeaseDuration": lease,
        }

    async def _add(self, client: str, internal_port: int, external_port: int, lease: int) -> None:
        await self._call(
            "AddPortMapping", "adding the mapping", **self._args(client, internal_port, external_port, lease)
        )

    async def delete(self, external_port: int) -> None:
        await self._call(
            "DeletePortMapping",
            "removing the mapping",
            NewRemoteHost="",
            NewExternalPort=external_port,
            NewProtocol="TCP",
        )
