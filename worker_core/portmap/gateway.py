"""The default gateway (the home router) and this host's address towards it.

Contract
--------
``default_gateway()`` -> the IPv4 address of the default route's gateway, or None: read from
``/proc/net/route`` on Linux; elsewhere guessed as ``.1`` of this host's /24 towards the
internet (most home routers; a wrong guess only makes NAT-PMP/PCP time out, and UPnP, which
finds the router by multicast, still works).  ``local_address(towards)`` -> the source address
the kernel would use to reach ``towards`` (no packet is sent; a link-local ``towards`` carries its
``%zone``).  ``default_gateway6()`` -> the IPv6 default route's next hop (``fe80::1%eth0`` for a
link-local one) and its interface index, read from ``/proc/net/ipv6_route``; None elsewhere or
without an IPv6 default route (the IPv6 pinhole then finds the router by SSDP alone).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from pathlib import Path


def local_address(towards: str) -> str | None:
    family = socket.AF_INET6 if ":" in towards else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((towards, 5351))
        return s.getsockname()[0]
    return None


def default_gateway6(route: Path = Path("/proc/net/ipv6_route")) -> tuple[str, int] | None:
    with contextlib.suppress(OSError, ValueError):
        for line in route.read_text().splitlines():
            fields = line.split()
            # destination, its prefix length, source, its length, next hop, metric, refs, use, flags, device
            if len(fields) < 10 or fields[0] != "0" * 32 or fields[1] != "00" or not int(fields[8], 16) & 2:
                continue
            hop = ipaddress.IPv6Address(bytes.fromhex(fields[4]))
            if hop.is_unspecified:
                continue
            index = socket.if_nametoindex(fields[9])
            return (f"{hop.compressed}%{fields[9]}" if hop.is_link_local else hop.compressed), index
    return None


def default_gateway() -> str | None:
    route = Path("/proc/net/route")
    with contextlib.suppress(OSError, ValueError):
        for line in route.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == "00000000" and int(fields[3], 16) & 2:  # RTF_GATEWAY
                return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
        return None
    own = local_address("25.0.0.1")  # any public address: only the route is looked up
    if own is None:
        return None
    net = ipaddress.IPv4Network(f"{own}/24", strict=False)
    return str(net.network_address + 1)
