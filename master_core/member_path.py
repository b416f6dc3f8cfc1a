"""How a member's tunnel reaches this master, for people: this PC, the LAN, the internet over
IPv4 or IPv6, or a relay.

Contract
--------
``member_path(peer)`` classifies a link's ``peer`` (:attr:`WorkerLink.peer`: the address the
tunnel came from, or a relayed connection's label, :func:`master_core.bridge_host.is_bridged`)
into a :class:`MemberPath`.  It is read from where the connection came from, not guessed from
what the member announced: a friend's tunnel through a port mapped on this master's router
comes from the friend's public address (``DIRECT``); one from the same home, from a private
address (``LAN``); a carrier-grade NAT's shared range (100.64.0.0/10) is not a LAN.  A peer
that is no address (``"?"``, a malformed label) is ``UNKNOWN``.
"""

from __future__ import annotations

import ipaddress
from enum import Enum

from .bridge_host import is_bridged

_CARRIER_NAT = ipaddress.ip_network("100.64.0.0/10")


class MemberPath(Enum):
    THIS_PC = "this PC"
    LAN = "LAN"
    DIRECT = "direct"  # across the internet over IPv4 (a mapped port, or a public address)
    IPV6 = "IPv6"  # across the internet over IPv6
    RELAYED = "relayed"
    UNKNOWN = "unknown"


def member_path(peer: str) -> MemberPath:
    """The path of a tunnel whose peer is ``peer`` (an address, with an optional ``%scope``)."""
    if is_bridged(peer):
        return MemberPath.RELAYED
    try:
        ip = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return MemberPath.UNKNOWN
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return MemberPath.THIS_PC
    if ip.is_link_local or (ip.is_private and ip not in _CARRIER_NAT):
        return MemberPath.LAN
    if isinstance(ip, ipaddress.IPv6Address):
        return MemberPath.IPV6
    return MemberPath.DIRECT
