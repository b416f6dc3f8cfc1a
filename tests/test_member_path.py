"""A member's path as the master reads it from where the tunnel came from."""

import pytest

from master_core.member_path import MemberPath, member_path


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
