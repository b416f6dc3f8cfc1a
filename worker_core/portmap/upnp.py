"""UPnP IGD (v1 and v2) port mapping, through ``async-upnp-client``.

Contract
--------
``await find_igd(timeout, source, scope)`` -> the description URL of the first Internet Gateway
Device that answers an SSDP search, or raises :class:`~worker_core.portmap.errors.NoAnswer`; an
IPv6 ``source`` searches ``[ff02::c]`` on interface ``scope`` (only IGDv2 has the IPv6 firewall).
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

``await Firewall.open(url, source)`` picks the IGDv2's ``WANIPv6FirewallControl:1`` service
(none: :class:`~worker_core.portmap.errors.Refused` ``NO_FIREWALL_SERVICE``), talking to it from
the IPv6 address ``source`` when its URL is IPv6 (the router only opens a pinhole for the
control point's own address: 606 otherwise).  On it:

* ``check()``: ``GetFirewallStatus``; a disabled firewall (nothing to open) is 702, pinholes
  not allowed 703, both as :class:`~worker_core.portmap.errors.Refused`;
* ``add(client, internal_port, lease)`` -> the pinhole's UniqueID (``AddPinhole``: any remote
  host and port, TCP; a lease within 1..86400 s);
* ``update(uid, lease)`` (``UpdatePinhole``) and ``delete(uid)`` (``DeletePinhole``).

Error texts say what each IGDv2 firewall code means (:data:`FIREWALL_ERRORS`: 606, 701-708).

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
FIREWALL_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
FIREWALL = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
CONFLICT, ONLY_PERMANENT = 718, 725
CONFLICT_TRIES = 4
REQUEST_TIMEOUT = 5  # seconds for one HTTP request to the router
TCP = 6
NO_FIREWALL_SERVICE = -1  # Refused.code when the gateway has no WANIPv6FirewallControl
FIREWALL_ERRORS = {  # UPnP IGDv2 WANIPv6FirewallControl:1, section 2.5
    606: "action not authorized: the router opens pinholes only for the asking machine's own address, port >= 1024",
    701: "pinhole space exhausted",
    702: "the router's IPv6 firewall is disabled (nothing to open)",
    703: "the router does not allow inbound pinholes",
    704: "no such pinhole (it expired or the router restarted)",
    705: "protocol not supported",
    706: "internal port wildcarding not allowed",
    707: "protocol wildcarding not allowed",
    708: "wildcard not permitted in source IP",
}


def _translate(e: BaseException, what: str) -> PortMapError:
    from async_upnp_client.exceptions import UpnpActionError, UpnpCommunicationError, UpnpContentError, UpnpError

    if isinstance(e, UpnpActionError) and e.error_code is not None:
        meaning = FIREWALL_ERRORS.get(int(e.error_code), "") if "pinhole" in what else ""
        return Refused(f"UPnP: {what}: the router answered error {e.error_code} ({e.error_desc or 'no text'})"
                       + (f": {meaning}" if meaning else ""), int(e.error_code))  # fmt: skip
    if isinstance(e, (UpnpCommunicationError, OSError, asyncio.TimeoutError)):
        return NoAnswer(f"UPnP: {what}: {type(e).__name__} {e}"[:300])
    if isinstance(e, (UpnpContentError, UpnpError, ValueError, KeyError, TypeError)):
        return Nonsense(f"UPnP: {what}: the router's answer makes no sense ({type(e).__name__} {e})"[:300])
    return PortMapError(f"UPnP: {what}: {type(e).__name__} {e}"[:300])


async def find_igd(timeout: int = 2, source: str | None = None, scope: int = 0) -> str:
    from async_upnp_client.search import async_search

    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    six = bool(source and ":" in source)
    devices = (FIREWALL_DEVICE,) if six else DEVICES
    # an IPv6 search goes to the link-local SSDP group on the interface that holds ``source``
    where: dict[str, Any] = (
        {"source": (source, 0, 0, scope), "target": ("ff02::c", 1900, 0, scope)}
        if six
        else {"source": (source, 0) if source else None}
    )

    async def on_response(headers: Any) -> None:
        if headers.get("st") in devices and headers.get("location") and not found.done():
            found.set_result(str(headers["location"]))

    async def search(target: str) -> None:
        await async_search(on_response, timeout=timeout, search_target=target, **where)

    searches = asyncio.gather(*(search(t) for t in devices), return_exceptions=True)
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
    raise NoAnswer(f"UPnP: no Internet Gateway Device{'v2' if six else ''} answered the search"
                   + (" over IPv6" if six else ""))  # fmt: skip


def _requester(source: str | None) -> Any:
    """async-upnp-client's HTTP requester; with ``source``, every request leaves from that address."""
    from async_upnp_client.aiohttp import AiohttpRequester, AiohttpSessionRequester
    from async_upnp_client.client import UpnpRequester

    if source is None:
        return AiohttpRequester(timeout=REQUEST_TIMEOUT)

    class Bound(UpnpRequester):
        async def async_http_request(self, http_request: Any) -> Any:
            import aiohttp

            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as session:
                return await AiohttpSessionRequester(session, timeout=REQUEST_TIMEOUT).async_http_request(http_request)

    return Bound()


async def _device(location: str, source: str | None = None) -> Any:
    from async_upnp_client.client_factory import UpnpFactory

    try:
        return await UpnpFactory(_requester(source), non_strict=True).async_create_device(location)
    except Exception as e:  # noqa: BLE001 - every failure of the library becomes one of ours
        raise _translate(e, "reading the router's description") from None


class _Service:
    def __init__(self, service: Any, location: str) -> None:
        self.service = service
        self.location = location

    async def _call(self, action: str, what: str, **args: Any) -> Any:
        try:
            return await self.service.action(action).async_call(**args)
        except KeyError:
            raise Nonsense(f"UPnP: the router has no {action} action") from None
        except Exception as e:  # noqa: BLE001
            raise _translate(e, what) from None


class Igd(_Service):
    def __init__(self, service: Any, location: str, version: int) -> None:
        super().__init__(service, location)
        self.version = version  # 1 or 2 (the connection service's)

    @classmethod
    async def open(cls, location: str) -> Igd:
        device = await _device(location)
        for name in SERVICES:
            service = device.find_service(name)
            if service is not None:
                return cls(service, location, 2 if name.endswith(":2") else 1)
        raise Nonsense("UPnP: the gateway offers no WANIPConnection or WANPPPConnection service")

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


class Firewall(_Service):
    """The IGDv2's IPv6 firewall control (inbound pinholes), spoken to from ``source``."""

    @classmethod
    async def open(cls, location: str, source: str) -> Firewall:
        from urllib.parse import urlsplit

        # from ``source`` when the router is reached over IPv6; over IPv4 it cannot be (the router
        # then refuses the pinhole with 606, a clear error)
        bound = source if ":" in (urlsplit(location).hostname or "") else None
        service = (await _device(location, bound)).find_service(FIREWALL)
        if service is None:
            raise Refused(
                "UPnP: the gateway has no IPv6 firewall control (WANIPv6FirewallControl)", NO_FIREWALL_SERVICE
            )
        return cls(service, location)

    async def check(self) -> None:
        answer = await self._call("GetFirewallStatus", "asking the pinhole firewall's status")
        enabled, allowed = (
            (answer.get("FirewallEnabled"), answer.get("InboundPinholeAllowed"))
            if hasattr(answer, "get")
            else (None, None)
        )
        if not isinstance(enabled, bool) or not isinstance(allowed, bool):
            raise Nonsense(f"UPnP: the firewall status makes no sense ({str(answer)[:100]})")
        if not enabled:
            raise Refused(f"UPnP: {FIREWALL_ERRORS[702]}", 702)
        if not allowed:
            raise Refused(f"UPnP: {FIREWALL_ERRORS[703]}", 703)

    async def add(self, client: str, internal_port: int, lease: int) -> int:
        answer = await self._call(
            "AddPinhole", "opening the pinhole", RemoteHost="", RemotePort=0, InternalClient=client,
            InternalPort=internal_port, Protocol=TCP, LeaseTime=lease,
        )  # fmt: skip
        uid = answer.get("UniqueID") if hasattr(answer, "get") else None
        if type(uid) is not int or not 0 <= uid < 65536:
            raise Nonsense(f"UPnP: the router named the pinhole {str(uid)[:40]!r}, not a number")
        return uid

    async def update(self, uid: int, lease: int) -> None:
        await self._call("UpdatePinhole", "renewing the pinhole", UniqueID=uid, NewLeaseTime=lease)

    async def delete(self, uid: int) -> None:
        await self._call("DeletePinhole", "removing the pinhole", UniqueID=uid)
