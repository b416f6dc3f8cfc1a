"""Which hops of a pipeline go direct, decided when the pipeline is built.

Contract
--------
``await route_pipeline(stages, epoch, paired)`` runs once every stage of a new pipeline has
answered ``Ready``, and returns one :class:`Hop` per hop (stage i -> stage i+1): direct, or
relayed through the master with the reason; and the loop-back hop (last stage -> first stage,
routed the same way: it carries the drawn tokens straight back, ``Step.loop``; not direct: the
master drives every step).  A hop is tried when stage i+1 announced a hop
listener (``Hello.hop_port``) and, in a paired group, both stages' pinned certificates are
known; stage i answers whether it dials at all (a worker may only dial: no inbound port, so no
firewall prompt on Windows; or have direct hops off).  Its address (:func:`hop_address`): the
host stage i+1 announced; else, when both stages' tunnels come from one address (one home
behind one NAT), the LAN address stage i+1's tunnel leaves from; else where its home router
maps its hop port, if it does; else the address the master sees its tunnel come from (for a
tunnel through a relay it sees no address: only an announced host or a mapping is dialled).
In a paired group, when stage i+1 registered its hop listener at a relay (``Hello.hop_relay``),
the ``Route`` also names that relay (``Route.next_relay``): stage i dials the direct address
first, and through the relay (by stage i+1's certificate fingerprint, TLS end to end) when it
has none or it does not answer; the hop is then stage to stage (``Hop.through``), not through
the master.  Such a hop crosses two links (stage i to the relay, the relay to stage i+1) as a
hop through the master does, and the cost model counts it so (:attr:`Hop.one_link`).

Two rounds of ``Route`` messages, each answered within ``ROUTE_TIMEOUT``: first every stage
learns whom to accept (a fresh secret per hop, and the previous stage's certificate) and
answers where its home router maps its hop port, if it does (``Routed.mapped``: then a stage in
another home dials that), then every stage with a candidate next hop dials it and says whether
it got through (``Routed``).
Reachability is what the dial measured, so a stage behind NAT, a firewall or a wrong announced
address is simply relayed.  A stage that does not answer in time costs only its hop
(relayed); a link that is gone raises :class:`~master_core.link.LinkGone` (the group re-plans
anyway).  The master keeps the first input and the last logits in every case.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from worker_core.bridge_host import is_bridged
from worker_core.wire import Route

from .link import WorkerLink

# seconds a stage may take to answer a Route (its dial: 3 s direct, then 6 s through a relay)
ROUTE_TIMEOUT = 12.0


@dataclass(frozen=True)
class Hop:
    """Stage i -> stage i+1 of the current pipeline."""

    direct: bool
    connect_ms: float = 0.0  # the direct hop's handshake as stage i measured it
    reason: str = ""  # why it is relayed
    through: str = ""  # the relay a direct hop crosses ("host:port"; "": straight to the next stage)

    @property
    def one_link(self) -> bool:
        """Does the hop cross only stage i's own link (direct, not through a relay)?  A hop
        through a relay, like one through the master, crosses two."""
        return self.direct and not self.through

    def describe(self) -> str:
        """For people: "direct (4 ms)", "through relay R (40 ms)" or "relayed: <why>"."""
        if not self.direct:
            return f"relayed: {self.reason}"
        how = f"through relay {self.through}" if self.through else "direct"
        return f"{how} ({self.connect_ms:.0f} ms handshake)"


NO_LOOP_BACK = Hop(False, reason="no pipeline")


def hop_address(link: WorkerLink, dialer: WorkerLink, mapped: str = "") -> str:
    """Where ``dialer`` dials ``link``'s hop listener ("" when it has none): the host ``link``
    announced; else, when both tunnels come from one address (one machine, or one home behind
    one NAT), the LAN address ``link``'s tunnel leaves from; else ``mapped``, where ``link``'s
    home router forwards to its hop listener (``Routed.mapped``); else the address the master
    sees."""
    hello = link.hello
    if not hello.hop_port:
        return ""
    # a relayed tunnel's peer is a label, not an address: where that member is is unknown
    seen = "" if is_bridged(link.peer) else link.peer.split("%")[0]
    same_place = hello.hop_lan and seen and seen == dialer.peer.split("%")[0]
    if mapped and not hello.hop_host and not same_place:
        return mapped
    host = hello.hop_host or (hello.hop_lan if same_place else seen)
    if not host or host == "?":
        return ""
    return f"[{host}]:{hello.hop_port}" if ":" in host else f"{host}:{hello.hop_port}"


async def route_pipeline(stages: list[WorkerLink], epoch: int, paired: bool) -> tuple[list[Hop], Hop]:
    """(hop i: stage i -> stage i+1, for every i; the loop-back: last stage -> first stage)."""
    n = len(stages)
    if n < 2:
        return [], Hop(False, reason="one stage: its own tokens need no hop")
    nxt = [(i + 1) % n for i in range(n)]  # hop i goes to stage nxt[i]; hop n-1 is the loop-back
    why_not: list[str] = []
    for i in range(n):
        a, b = stages[i], stages[nxt[i]]
        if not b.hello.hop_port:
            why_not.append(f"{b.name} takes no inbound hops (direct hops off, or it only dials)")
        elif paired and not (a.cert and b.cert):
            why_not.append("no pinned certificate for one of the two")
        else:
            why_not.append("")
    tokens = [secrets.token_hex(16) if not why else "" for why in why_not]

    def accept(i: int) -> dict[str, str]:
        before = (i - 1) % n  # the stage that dials stage i (the last one dials the first)
        if not tokens[before]:
            return {}
        return {"accept_token": tokens[before], "accept_cert": stages[before].cert}

    async def first(i: int) -> str:
        """Stage i learns whom to accept; its answer says where its router maps its hop port."""
        return (await stages[i].route(Route(epoch, **accept(i)), ROUTE_TIMEOUT)).mapped

    mapped = await asyncio.gather(*(first(i) for i in range(n)))
    addresses = [hop_address(stages[nxt[i]], stages[i], mapped[nxt[i]]) for i in range(n)]
    relays = [stages[nxt[i]].hello.hop_relay if paired else "" for i in range(n)]
    for i in range(n):
        if not why_not[i] and not addresses[i] and not relays[i]:
            why_not[i] = f"no address to dial {stages[nxt[i]].name} at (it came through a relay and announced none)"

    async def dial(i: int) -> Hop:
        if why_not[i]:
            return Hop(False, reason=why_not[i])
        b = stages[nxt[i]]
        route = Route(
            epoch,
            **accept(i),
            next_address=addresses[i],
            next_cert=b.cert,
            next_token=tokens[i],
            next_relay=relays[i],
        )
        try:
            routed = await stages[i].route(route, ROUTE_TIMEOUT)
        except asyncio.TimeoutError:
            return Hop(False, reason=f"{stages[i].name} did not answer the route in {ROUTE_TIMEOUT:.0f} s")
        if not routed.direct:
            return Hop(False, reason=f"{stages[i].name}: {routed.reason}")
        return Hop(True, routed.connect_ms, through=routed.through)

    hops = list(await asyncio.gather(*(dial(i) for i in range(n))))
    return hops[:-1], hops[-1]
