"""The lab's topologies: which homes, routers and hosts exist, and every address in them (pure data).

Contract
--------
A :class:`Topology` is homes (each a LAN behind its own router) plus hosts placed straight on
the "internet" segment.  :data:`TOPOLOGIES` names the ones ``molink lab up --topology`` knows.
:func:`plan` turns a topology into :class:`Node` s (one network namespace each) with every
address fixed; nothing here runs a command.

Addresses (they exist only inside the lab's namespaces, which have no link to the machine's
network):

* the internet segment is ``INTERNET`` (``25.0.0.0/24``): not a reserved range, because
  miniupnpd 2.3.1 refuses to map while its WAN address is in one (a home router WAN is
  ``25.0.0.(10+i)``, a public host ``25.0.0.(100+k)``); IPv6 ``2a0f:ff00::/64``;
* home ``i``'s LAN is ``192.168.(10+i).0/24`` (router ``.1``, hosts ``.10`` up) and, for an
  IPv6 home, ``2a0f:ff00:0:(10+i)::/64``;
* behind a carrier-grade NAT the home router's WAN is ``100.64.(10+i).2/24``, the carrier's
  ``100.64.(10+i).1`` (RFC 6598 shared space), and the carrier's own WAN is on the internet.

NAT kinds: ``eim`` is Linux masquerade (a flow keeps its source port where it can: endpoint
independent mapping, endpoint dependent filtering); ``symmetric`` is ``masquerade
fully-random`` (a new random port per flow).  A home with ``upnp`` runs miniupnpd (UPnP IGD,
NAT-PMP, PCP) on its router; when the home has IPv6 too, the same miniupnpd opens IPv6
pinholes in its firewall (UPnP ``WANIPv6FirewallControl``, PCP MAP over IPv6).  A home router can
be put behind a carrier (``cgnat``); an IPv6 home behind one has native IPv6 through the carrier
(routed, not translated: ``2a0f:ff00:1:(10+i)::/64`` between carrier and router), as many ISPs
give, so only a pinhole lets anyone in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

INTERNET = "25.0.0.0/24"
INTERNET6 = "2a0f:ff00::/64"
NAME = re.compile(r"[a-z][a-z0-9]{0,9}")  # a lab's or a host's name


@dataclass(frozen=True)
class Home:
    name: str
    hosts: tuple[str, ...]
    nat: str = "eim"  # eim | symmetric
    upnp: bool = False  # miniupnpd on the router (UPnP IGD, NAT-PMP, PCP)
    cgnat: bool = False  # the home router's WAN is behind a carrier-grade NAT
    ipv6: bool = False  # global IPv6 on the LAN, a stateful firewall on the router
    internet: bool = True  # False: a LAN alone (no router WAN)


@dataclass(frozen=True)
class Topology:
    homes: tuple[Home, ...]
    public: tuple[str, ...] = ()  # hosts straight on the internet segment
    about: str = ""


TOPOLOGIES: dict[str, Topology] = {
    "upnp": Topology(
        (Home("a", ("a", "a2"), upnp=True), Home("b", ("b",))),
        ("pub",),
        "home a (hosts a, a2) behind a router with miniupnpd; home b (host b) behind a router without; pub",
    ),
    "symmetric": Topology(
        (Home("a", ("a",)), Home("b", ("b",), nat="symmetric")),
        ("pub",),
        "home a behind an endpoint-independent NAT, home b behind a symmetric NAT (fully-random); pub",
    ),
    "relayhops": Topology(
        (
            Home("s", ("s",), nat="symmetric"),
            Home("t", ("t",), nat="symmetric"),
            Home("c", ("c",), cgnat=True),
        ),
        ("pub",),
        "homes s and t each behind a symmetric NAT (fully-random), home c behind its router behind a "
        "carrier-grade NAT; no router maps ports; pub",
    ),
    "cgnat": Topology(
        (Home("b", ("b",), upnp=True), Home("c", ("c",), upnp=True, cgnat=True)),
        ("pub",),
        "home c behind its router (miniupnpd) behind a carrier-grade NAT; home b with miniupnpd; pub",
    ),
    "ipv6": Topology(
        (Home("v", ("v",), ipv6=True), Home("b", ("b",))),
        ("pub", "pub2"),
        "home v with global IPv6 behind a stateful firewall (and IPv4 NAT); home b; pub and pub2 (dual stack)",
    ),
    "pinhole": Topology(
        (Home("v", ("v",), upnp=True, ipv6=True), Home("w", ("w",), upnp=True, ipv6=True, cgnat=True)),
        ("pub", "pub2"),
        "homes v and w with global IPv6 behind stateful firewalls whose routers (miniupnpd) open IPv6 pinholes "
        "(UPnP WANIPv6FirewallControl, PCP); v's router also maps IPv4 ports, w's IPv4 is behind a carrier-grade "
        "NAT (nothing maps) while its IPv6 is native; pub and pub2 (dual stack)",
    ),
    "hops": Topology(
        (Home("a", ("a",), upnp=True), Home("d", ("d",), upnp=True), Home("b", ("b",))),
        ("pub",),
        "homes a and d behind routers with miniupnpd, home b behind one without; pub",
    ),
    "lan": Topology((Home("a", ("a", "a2"), internet=False),), (), "two hosts a, a2 on one LAN, nothing else"),
    "all": Topology(
        (
            Home("a", ("a", "a2"), upnp=True),
            Home("b", ("b",)),
            Home("s", ("s",), nat="symmetric"),
            Home("c", ("c",), upnp=True, cgnat=True),
            Home("v", ("v",), ipv6=True),
        ),
        ("pub",),
        "every kind of home above on one internet, and pub",
    ),
}


@dataclass
class Iface:
    name: str  # inside its namespace
    peer_node: str  # the node at the other end of the veth
    peer_name: str
    addrs: list[str] = field(default_factory=list)  # CIDR
    bridge: str | None = None  # enslave to this bridge of its own node
    shaped: bool = False  # tbf on its egress when the lab shapes links


@dataclass
class Node:
    name: str  # lab-local: a host, "r-<home>", "cg-<home>" or "inet"
    kind: str  # host | router | carrier | internet
    home: Home | None = None
    index: int = 0  # the home's index
    ifaces: list[Iface] = field(default_factory=list)
    bridges: dict[str, list[str]] = field(default_factory=dict)  # bridge -> its own addresses
    routes: list[str] = field(default_factory=list)  # `ip route add` arguments
    routes6: list[str] = field(default_factory=list)
    forward: bool = False

    @property
    def address(self) -> str | None:
        """This node's first IPv4 address (no prefix length)."""
        for addrs in [*(i.addrs for i in self.ifaces), *self.bridges.values()]:
            for a in addrs:
                if ":" not in a:
                    return a.split("/")[0]
        return None

    @property
    def address6(self) -> str | None:
        for i in self.ifaces:
            for a in i.addrs:
                if ":" in a:
                    return a.split("/")[0]
        return None


def lan_prefix(i: int) -> str:
    return f"192.168.{10 + i}"


def v6_lan(i: int) -> str:
    return f"2a0f:ff00:0:{10 + i}"


def plan(topo: Topology) -> dict[str, Node]:
    """Every node of ``topo`` with its interfaces, bridges, addresses and routes."""
    nodes: dict[str, Node] = {}
    names = [h for home in topo.homes for h in home.hosts] + list(topo.public)
    for n in names + [home.name for home in topo.homes]:
        if not NAME.fullmatch(n):
            raise ValueError(f"lab name {n!r}: lower-case letters and digits, 1-10, starting with a letter")
    if len(set(names)) != len(names):
        raise ValueError("host names must differ")
    has_internet = any(home.internet for home in topo.homes) or bool(topo.public)
    v6_homes = [(i, home) for i, home in enumerate(topo.homes) if home.ipv6 and home.internet]
    if has_internet:
        nodes["inet"] = Node("inet", "internet", bridges={"br0": ["25.0.0.1/24", "2a0f:ff00::1/64"]})
    uplinks = 0

    def uplink(node: Node, addr: str, addr6: str | None) -> None:
        nonlocal uplinks
        uplinks += 1
        peer = f"p{uplinks}"
        node.ifaces.append(Iface("wan0", "inet", peer, [addr, *([addr6] if addr6 else [])], shaped=True))
        nodes["inet"].ifaces.append(Iface(peer, node.name, "wan0", bridge="br0", shaped=True))

    for i, home in enumerate(topo.homes):
        lan = lan_prefix(i)
        router = Node(f"r-{home.name}", "router", home, i, forward=True)
        router.bridges["br0"] = [f"{lan}.1/24", *([f"{v6_lan(i)}::1/64"] if home.ipv6 else [])]
        nodes[router.name] = router
        for j, host in enumerate(home.hosts):
            node = Node(host, "host", home, i)
            addrs = [f"{lan}.{10 + j}/24", *([f"{v6_lan(i)}::{10 + j}/64"] if home.ipv6 else [])]
            node.ifaces.append(Iface("eth0", router.name, f"l{j}", addrs))
            router.ifaces.append(Iface(f"l{j}", host, "eth0", bridge="br0"))
            if home.internet:
                node.routes.append(f"default via {lan}.1")
                if home.ipv6:
                    node.routes6.append(f"default via {v6_lan(i)}::1")
            nodes[host] = node
        if not home.internet:
            continue
        wan = f"25.0.0.{10 + i}/24"
        if home.cgnat:
            carrier = Node(f"cg-{home.name}", "carrier", home, i, forward=True)
            nodes[carrier.name] = carrier
            cg = f"100.64.{10 + i}"
            six = f"2a0f:ff00:1:{10 + i}"  # the carrier-router link's IPv6 (an IPv6 home: routed natively)
            router.ifaces.append(Iface("wan0", carrier.name, "lan0", [f"{cg}.2/24", *([f"{six}::2/64"] * home.ipv6)]))
            carrier.ifaces.append(Iface("lan0", router.name, "wan0", [f"{cg}.1/24", *([f"{six}::1/64"] * home.ipv6)]))
            router.routes.append(f"default via {cg}.1")
            uplink(carrier, wan, f"2a0f:ff00::{10 + i}/64" if home.ipv6 else None)
            carrier.routes.append("default via 25.0.0.1")
            if home.ipv6:
                router.routes6.append(f"default via {six}::1")
                carrier.routes6 += [f"{v6_lan(i)}::/64 via {six}::2", "default via 2a0f:ff00::1"]
        else:
            uplink(router, wan, f"2a0f:ff00::{10 + i}/64" if home.ipv6 else None)
            router.routes.append("default via 25.0.0.1")
            if home.ipv6:
                router.routes6.append("default via 2a0f:ff00::1")
    for k, host in enumerate(topo.public):
        node = Node(host, "host")
        nodes[host] = node
        uplink(node, f"25.0.0.{100 + k}/24", f"2a0f:ff00::{100 + k}/64")
    if has_internet:  # the internet segment routes each IPv6 home's prefix to its router
        for i, _home in v6_homes:
            for node in nodes.values():
                if node.kind == "internet" or (node.kind == "host" and node.home is None):
                    node.routes6.append(f"{v6_lan(i)}::/64 via 2a0f:ff00::{10 + i}")
        nodes["inet"].forward = True
    return nodes
