"""How a member's tunnel reaches this master, for people: this PC, the LAN, the internet over
IPv4 or IPv6, or a relay.

Contract
--------
``member_path(peer)`` classifies a link's ``peer`` (:attr:`WorkerLink.peer`: the address the
tunnel came from, or a relayed connection's label, :func:`worker_core.bridge_host.is_bridged`)
into a :class:`~worker_core.address.MemberPath`.  It is read from where the connection came
from, not guessed from what the member announced: a friend's tunnel through a port mapped on
this master's router comes from the friend's public address (``DIRECT``); one from the same
home, from a private address (``LAN``); the address rules are
:func:`worker_core.address.address_path`, which a worker uses for its own side.
"""

from __future__ import annotations

from worker_core.address import MemberPath, address_path
from worker_core.bridge_host import is_bridged

__all__ = ["MemberPath", "member_path"]


def member_path(peer: str) -> MemberPath:
    """The path of a tunnel whose peer is ``peer`` (an address, or a relayed connection's label)."""
    return MemberPath.RELAYED if is_bridged(peer) else address_path(peer)
