"""A member's path as the master reads it from where the tunnel came from, and as the worker
names the way it dialled (the same words: the tray shows the one, the host's tray the other)."""

import pytest

from master_core.member_path import MemberPath, member_path
from worker_core.worker import path_to


@pytest.mark.parametrize(
    ("peer", "path"),
    [
        ("127.0.0.1", MemberPath.THIS_PC),
        ("::1", MemberPath.THIS_PC),
        ("::ffff:127.0.0.1", MemberPath.THIS_PC),
        ("192.168.1.23", MemberPath.LAN),
        ("10.0.0.5", MemberPath.LAN),
        ("172.16.4.4", MemberPath.LAN),
        ("::ffff:192.168.1.23", MemberPath.LAN),
        ("fd12:3456::7", MemberPath.LAN),  # unique local
        ("fe80::1%eth0", MemberPath.LAN),  # link local, with its scope
        ("25.0.0.11", MemberPath.DIRECT),  # the lab's "internet"
        ("100.64.3.2", MemberPath.DIRECT),  # a carrier-grade NAT's shared range is no home LAN
        ("2a0f:ff00::101", MemberPath.IPV6),
        ("bridge:25.0.0.100:7440#3", MemberPath.RELAYED),
        ("?", MemberPath.UNKNOWN),
        ("", MemberPath.UNKNOWN),
    ],
)
def test_member_path(peer, path):
    assert member_path(peer) is path


@pytest.mark.parametrize(
    ("master", "path"),
    [
        ("127.0.0.1:7733", "this PC"),
        ("192.168.1.20:7733", "LAN"),
        ("[fe80::1%eth0]:7733", "LAN"),
        ("25.0.0.10:7733", "direct"),
        ("[2a0f:ff00::10]:7733", "IPv6"),
        ("pc.example.org:7733", "direct"),  # a name: where it leads is not known
    ],
)
def test_the_workers_own_path(master, path):
    assert path_to(master) == path
    assert path in {p.value for p in MemberPath}
