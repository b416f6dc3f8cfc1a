"""PCP (RFC 6887) MAP: a TCP port mapping, with the external address in the same answer.

Contract
--------
``await map_tcp(gateway, client_ip, internal_port, external_port, lifetime, nonce)`` ->
:class:`Lease` (the external address and port the router assigned, and the lifetime granted);
``lifetime=0`` deletes the mapping made with the same ``nonce`` (RFC 6887 §15).  ``client_ip``
is this host's address towards the gateway (the router checks it: ADDRESS_MISMATCH otherwise).
Answers are checked (size, version, R bit, opcode, nonce, protocol, internal port); an error
result raises :class:`~worker_core.portmap.errors.Refused` with its code, a broken answer
:class:`~worker_core.portmap.errors.Nonsense`.  Both families: an IPv4 ``client_ip`` asks the
NAT for a mapping (address fields carry IPv4-mapped IPv6, the suggested external address is
``::ffff:0.0.0.0``); an IPv6 one asks the router's firewall for a pinhole to that address
(RFC 6887 §11: the "external" address the router answers is the client's own, the suggested one
is ``::``), sent to the router's IPv6 address from ``client_ip`` itself (``source``: the router
checks that the header's address is the packet's, ADDRESS_MISMATCH otherwise).
``await announce(gateway)`` sends ANNOUNCE (RFC 6887 §14.1) and returns when a PCP server
answers it with success: a probe that makes nothing.  ``port`` overrides 5351 (tests).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .errors import Nonsense, Refused
from .udp import PORT, exchange

VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
TCP = 6
RESULTS = {
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}


@dataclass(frozen=True)
class Lease:
    external_host: str
    external_port: int
    lifetime: int  # seconds granted


def _v6(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip).packed


def request(client_ip: str, internal_port: int, external_port: int, lifetime: int, nonce: bytes) -> bytes:
    header = struct.pack("!BBHI", VERSION, OP_MAP, 0, lifetime) + _v6(client_ip)
    any_external = "::" if ipaddress.ip_address(client_ip.split("%")[0]).version == 6 else "0.0.0.0"
    body = nonce + struct.pack("!B3xHH", TCP, internal_port, external_port) + _v6(any_external)
    return header + body


def _result(data: bytes, opcode: int) -> int:
    """The lifetime of an answer to ``opcode`` (success), after its common header is checked."""
    if len(data) < 24 or data[0] != VERSION or data[1] != 0x80 | opcode:
        raise Nonsense(f"PCP: malformed answer ({len(data)} bytes, starting {data[:2].hex()})")
    result = data[3]
    if result:
        raise Refused(f"PCP: the router refused: {RESULTS.get(result, f'result {result}')}", result)
    return struct.unpack_from("!I", data, 4)[0]


def parse(data: bytes, internal_port: int, nonce: bytes, deleting: bool = False) -> Lease | None:
    """The lease in an answer; None for a datagram that is not ours (a NAT-PMP answer, another nonce)."""
    if len(data) >= 1 and data[0] == 0:
        return None  # NAT-PMP's version 0 on the shared port
    lifetime = _result(data, OP_MAP)
    if len(data) < 60:
        raise Nonsense(f"PCP: MAP answer of {len(data)} bytes, expected 60")
    if data[24:36] != nonce:
        return None  # another mapping's answer
    protocol = data[36]
    internal, external = struct.unpack_from("!HH", data, 40)
    address = ipaddress.IPv6Address(data[44:60])
    host = str(address.ipv4_mapped or address)
    if protocol != TCP or internal != internal_port:
        raise Nonsense(f"PCP: answer for protocol {protocol} port {internal}, asked TCP {internal_port}")
    if not deleting and (not 0 < external < 65536 or lifetime == 0 or address.is_unspecified):
        raise Nonsense(f"PCP: mapping to {host}:{external} for {lifetime} s makes no sense")
    return Lease(host, external, lifetime)


async def map_tcp(
    gateway: str,
    client_ip: str,
    internal_port: int,
    external_port: int,
    lifetime: int,
    nonce: bytes,
    port: int = PORT,
    tries: int = 3,
    source: str | None = None,
) -> Lease:
    if len(nonce) != 12:
        raise ValueError("a PCP nonce is 12 bytes")
    return await exchange(
        gateway,
        request(client_ip, internal_port, external_port, lifetime, nonce),
        lambda data: parse(data, internal_port, nonce, deleting=lifetime == 0),
        tries=tries,
        port=port,
        source=source,
    )


def announce_request(client_ip: str) -> bytes:
    return struct.pack("!BBHI", VERSION, OP_ANNOUNCE, 0, 0) + _v6(client_ip)


async def announce(gateway: str, client_ip: str, port: int = PORT, tries: int = 2, source: str | None = None) -> None:
    def accept(data: bytes) -> bool | None:
        if len(data) >= 1 and data[0] == 0:
            return None  # a NAT-PMP answer on the shared port
        _result(data, OP_ANNOUNCE)
        return True

    await exchange(gateway, announce_request(client_ip), accept, tries=tries, port=port, source=source)
