"""``HOST:PORT``: the one parser and formatter of addresses (IPv6 in brackets) for the whole code.

Contract
--------
``parse_address(text)`` -> ``(host, port)``: ``host`` is a DNS name (letters, digits, ``-``
and ``.``, lower-cased), an IPv4 address, or an IPv6 address written in brackets (``[::1]:7733``;
a link-local zone ``[fe80::1%eth0]:7733`` is kept, since it is needed to dial one); the
host comes back without brackets, the port is 1-65535.  Anything else raises
:class:`BadAddress` (a ``ValueError``) saying what an address looks like.
``format_address(host, port)`` is its inverse (brackets around any host with a ``:``), also for
URLs: ``f"wss://{format_address(h, p)}/v1/tunnel"``.  ``is_address``, ``is_loopback``: checks
of a ``HOST:PORT`` and of a host.  ``address_path(host)`` names the kind of path to or from a
host (:class:`MemberPath`: this PC, LAN, direct, IPv6), for people, on both sides of a tunnel.
"""

from __future__ import annotations

import ipaddress
import re
from enum import Enum

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_ZONE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


class BadAddress(ValueError):
    """Not a HOST:PORT address."""


def check_host(host: str) -> str:
    """The host, normalised (IP addresses compressed, names lower-cased), or :class:`BadAddress`."""
    bad = BadAddress(f"not a host name or IP address: {host[:80]!r}")
    if not isinstance(host, str) or not host or len(host) > 253 or not host.isascii():
        raise bad
    if ":" in host:
        addr, _, zone = host.partition("%")
        try:
            ip = ipaddress.IPv6Address(addr)
        except ValueError:
            raise bad from None
        if zone and not _ZONE.fullmatch(zone):
            raise bad
        return ip.compressed + (f"%{zone}" if zone else "")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise bad from None
    name = host.lower().rstrip(".")
    if not name or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise bad
    return name


def parse_address(text: str) -> tuple[str, int]:
    bad = BadAddress(f"an address looks like 192.168.1.20:7733 or [2001:db8::5]:7733, not {str(text)[:80]!r}")
    if not isinstance(text, str):
        raise bad
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise bad
        if ":" not in host:
            raise bad
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise bad  # a bare IPv6 address: the port cannot be told from the address
    if not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise bad
    try:
        return check_host(host), int(port)
    except BadAddress:
        raise bad from None


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_address(text: str) -> bool:
    """Whether ``text`` is a HOST:PORT :func:`parse_address` takes."""
    try:
        parse_address(text)
    except BadAddress:
        return False
    return True


class MemberPath(Enum):
    """How a tunnel between a member and its master goes, for people (both sides use these words)."""

    THIS_PC = "this PC"
    LAN = "LAN"
    DIRECT = "direct"  # across the internet over IPv4 (a mapped port, or a public address)
    IPV6 = "IPv6"  # across the internet over IPv6
    RELAYED = "relayed"
    UNKNOWN = "unknown"


_CARRIER_NAT = ipaddress.ip_network("100.64.0.0/10")


def address_path(host: str) -> MemberPath:
    """The path to or from ``host`` (an address, with an optional ``%scope``): loopback, a private
    or link-local address (a LAN; a carrier-grade NAT's shared range is not one), a public IPv4
    or IPv6 address; ``UNKNOWN`` for anything that is no address."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return MemberPath.UNKNOWN
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return MemberPath.THIS_PC
    if ip.is_link_local or (ip.is_private and ip not in _CARRIER_NAT):
        return MemberPath.LAN
    return MemberPath.IPV6 if isinstance(ip, ipaddress.IPv6Address) else MemberPath.DIRECT
