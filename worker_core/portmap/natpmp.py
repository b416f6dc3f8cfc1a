"""NAT-PMP (RFC 6886): a TCP port mapping and the external IPv4 address, from the gateway.

Contract
--------
``await external_address(gateway)`` -> the router's external IPv4 address (opcode 0);
``await map_tcp(gateway, internal_port, external_port, lifetime)`` -> :class:`Lease` (opcode 2;
``external_port`` is only a suggestion, the router says which it gave); ``lifetime=0`` with
``external_port=0`` deletes the mapping.  Answers are checked byte by byte (size, version,
opcode, result, internal port); an error result raises
:class:`~worker_core.portmap.errors.Refused` with its code, a broken answer
:class:`~worker_core.portmap.errors.Nonsense`.  ``port`` overrides 5351 (tests).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .errors import Nonsense, Refused
from .udp import PORT, exchange

RESULTS = {
    1: "unsupported version",
    2: "not authorized (NAT-PMP is switched off on the router)",
    3: "network failure (the router has no external address yet)",
    4: "out of resources",
    5: "unsupported opcode",
}


@dataclass(frozen=True)
class Lease:
    internal_port: int
    external_port: int
    lifetime: int  # seconds granted


def _check(data: bytes, opcode: int, size: int) -> bytes:
    if len(data) < 4 or data[0] != 0 or data[1] != 128 + opcode:
        if len(data) >= 2 and data[0] == 2:
            return b""  # a PCP answer to our NAT-PMP request on the shared port: not ours
        raise Nonsense(f"NAT-PMP: malformed answer ({len(data)} bytes, starting {data[:2].hex()})")
    (result,) = struct.unpack_from("!H", data, 2)
    if result:
        raise Refused(f"NAT-PMP: the router refused: {RESULTS.get(result, f'result {result}')}", result)
    if len(data) < size:
        raise Nonsense(f"NAT-PMP: answer of {len(data)} bytes, expected {size}")
    return data


async def external_address(gateway: str, port: int = PORT, tries: int = 3) -> str:
    def accept(data: bytes) -> str | None:
        data = _check(data, 0, 12)
        if not data:
            return None
        return str(ipaddress.IPv4Address(data[8:12]))

    return await exchange(gateway, bytes([0, 0]), accept, tries=tries, port=port)


async def map_tcp(
    gateway: str, internal_port: int, external_port: int, lifetime: int, port: int = PORT, tries: int = 3
) -> Lease:
    request = struct.pack("!BBHHHI", 0, 2, 0, internal_port, external_port, lifetime)

    def accept(data: bytes) -> Lease | None:
        data = _check(data, 2, 16)
        if not data:
            return None
        _epoch, internal, external, granted = struct.unpack_from("!IHHI", data, 4)
        if internal != internal_port:
            raise Nonsense(f"NAT-PMP: answer for internal port {internal}, asked {internal_port}")
        if lifetime and (not 0 < external < 65536 or granted == 0):
            raise Nonsense(f"NAT-PMP: mapping to port {external} for {granted} s makes no sense")
        return Lease(internal, external, granted)

    return await exchange(gateway, request, accept, tries=tries, port=port)
