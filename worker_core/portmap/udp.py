"""One UDP request/response exchange with the gateway on port 5351 (NAT-PMP and PCP share it).

Contract
--------
``await exchange(gateway, request, accept, tries, first_wait)`` sends ``request`` to
``gateway:5351`` and waits for a datagram from that address that ``accept(data)`` takes (returns
a value, not None); it resends after ``first_wait`` seconds, doubling each time (RFC 6886 /
RFC 6887 retransmission, cut short: a home router answers within milliseconds or not at all),
``tries`` sends in all, then raises :class:`NoAnswer`.  ``gateway`` may be IPv6 (a link-local
one with its ``%zone``); ``source`` binds the sending address (an IPv6 pinhole is asked from the
address it opens).  Datagrams from other addresses, and
those ``accept`` rejects (None), are ignored; ``accept`` raising a
:class:`~worker_core.portmap.errors.PortMapError` ends the exchange with it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import TypeVar

from .errors import NoAnswer

PORT = 5351
T = TypeVar("T")


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, gateway: str, accept: Callable[[bytes], object]) -> None:
        self.gateway = gateway
        self.accept = accept
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not _same(addr[0], self.gateway) or self.done.done():
            return
        try:
            value = self.accept(data)
        except Exception as e:  # noqa: BLE001 - a decoding error ends the exchange with it
            self.done.set_exception(e)
            return
        if value is not None:
            self.done.set_result(value)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: nobody listens there
        if not self.done.done():
            self.done.set_exception(NoAnswer(f"{self.gateway}:{PORT} is closed ({exc})"))


def _same(a: str, b: str) -> bool:
    """One address however written (``::1`` / ``0::1``; a zone only on one side still matches)."""
    try:
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b


async def exchange(
    gateway: str,
    request: bytes,
    accept: Callable[[bytes], T | None],
    tries: int = 3,
    first_wait: float = 0.25,
    port: int = PORT,
    source: str | None = None,
) -> T:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Receiver(gateway, accept), remote_addr=(gateway, port), local_addr=(source, 0) if source else None
    )
    try:
        wait = first_wait
        for _ in range(tries):
            transport.sendto(request)
            try:
                return await asyncio.wait_for(asyncio.shield(proto.done), wait)
            except asyncio.TimeoutError:
                wait *= 2
        raise NoAnswer(f"no answer from {gateway}:{port} after {tries} tries")
    finally:
        transport.close()
