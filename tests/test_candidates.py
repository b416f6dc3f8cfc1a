"""Candidates end to end on loopback: sealed into the pairing welcome, carried by the join link,
raced to a TLS handshake before pairing (racing burns no attempt) and before each tunnel."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from harness import paired_config, run
from tiny_models import make_tiny_checkpoint

from app.group.client import invitation_link, pair_with_group
from app.group.links import JoinLink, build_link, parse_link
from master_core.server import Master
from worker_core.candidates import Candidate, Kind
from worker_core.config import WorkerConfig
from worker_core.identity import client_context, load_or_create
from worker_core.pairing import JoinedGroup
from worker_core.worker import pick_path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), num_layers=2)


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now: connections are refused
    return port


def test_link_carries_every_candidate_and_master_first_for_old_clients():
    link = invitation_link("47-8203-1956", "g", ["lan~192.168.1.5:7733", "mapped~25.0.0.10:40001"])
    parsed = parse_link(link)
    assert parsed.master == "25.0.0.10:40001"  # what an old client dials: the outside address
    assert [c.kind for c in parsed.via] == [Kind.LAN, Kind.MAPPED]
    assert parse_link(build_link(parsed)) == parsed
    assert "via=lan~192.168.1.5:7733,mapped~25.0.0.10:40001" in link
    with pytest.raises(ValueError, match="addresses are not valid"):
        parse_link("molink://join?code=4782031956&via=lan~nohost")
    old = JoinLink(code="47-8203-1956", master="1.2.3.4:5")  # links without via still parse
    assert parse_link(build_link(old)).via == ()


def test_welcome_seals_candidates_and_a_link_joins_past_dead_addresses(ckpt, tmp_path):
    async def scenario() -> None:
        master = Master(paired_config(ckpt, tmp_path / "m"))
        await master.start()
        try:
            port = master.group_port.port
            assert master.reach is not None and master.reach.mapper is None  # loopback: nothing mapped
            assert "only this network" in master.reach.summary()
            code = master.new_code()
            dead = _dead_port()
            link = build_link(
                JoinLink(
                    code=code,
                    via=(Candidate(Kind.LAN, "127.0.0.1", dead), Candidate(Kind.MAPPED, "127.0.0.1", port)),
                )
            )
            joined = await pair_with_group(link, None, tmp_path / "w", "alice")
            assert joined.master_port == port
            assert joined.candidates == (f"lan~127.0.0.1:{port}",)  # what the master sealed in
            joined.save(tmp_path / "w")
            assert JoinedGroup.load(tmp_path / "w") == joined
            nameplate = code.split("-")[0]
            assert master.invitations._by_nameplate[nameplate].attempts == 1  # racing began one pairing only

            ident = load_or_create(tmp_path / "w" / "identity", "alice")
            cfg = WorkerConfig(
                master=f"127.0.0.1:{dead}",
                candidates=(f"lan~127.0.0.1:{_dead_port()}", f"mapped~127.0.0.1:{port}"),
                tls=client_context(ident, joined.master_cert),
            )
            chosen = await pick_path(cfg)
            assert chosen is not None and chosen.address == f"127.0.0.1:{port}"  # the one whose pinned TLS checks
            stranger = load_or_create(tmp_path / "x" / "identity", "x")
            other = WorkerConfig(
                master=f"127.0.0.1:{port}",
                candidates=(f"lan~127.0.0.1:{port}",),
                tls=client_context(stranger, stranger.cert_pem),  # pins another certificate
            )
            assert await asyncio.wait_for(pick_path(other), 30) is None  # none checks: the dial fails on its own
        finally:
            await master.stop()

    run(scenario(), 120)


# ---------------------------------------------------------------- the relay as a candidate


def _timed_race(plan: dict[Candidate, float | None], **kw: float) -> tuple[Candidate, list[tuple[Candidate, float]]]:
    """Race ``plan`` (candidate -> seconds until its dial succeeds; None: it fails at once; inf:
    it never answers); returns the winner and when each dial started."""
    from worker_core.candidates import race

    started: list[tuple[Candidate, float]] = []

    async def scenario() -> Candidate:
        t0 = asyncio.get_running_loop().time()

        async def dial(c: Candidate) -> Candidate:
            started.append((c, asyncio.get_running_loop().time() - t0))
            wait = plan[c]
            if wait is None:
                raise ConnectionRefusedError("refused")
            await asyncio.sleep(wait)
            return c

        chosen, _ = await race(list(plan), dial, **kw)
        return chosen

    return run(scenario(), 30), started


LAN = Candidate(Kind.LAN, "192.168.1.5", 7733)
MAPPED = Candidate(Kind.MAPPED, "25.0.0.10", 7733)
RELAY = Candidate(Kind.RELAY, "25.0.0.100", 7735)


def test_a_direct_path_that_answers_wins_over_a_faster_relay():
    chosen, started = _timed_race({RELAY: 0.0, MAPPED: 0.3, LAN: None}, relay_delay=1.0)
    assert chosen == MAPPED
    assert [c for c, _ in started] == [LAN, MAPPED]  # the relay was never dialled: the direct path won first


def test_the_relay_starts_at_once_when_every_direct_path_failed():
    chosen, started = _timed_race({RELAY: 0.0, MAPPED: None, LAN: None}, relay_delay=1.0)
    assert chosen == RELAY
    assert [c for c, _ in started] == [LAN, MAPPED, RELAY] and started[-1][1] < 0.5, started


def test_the_relay_starts_after_its_delay_when_a_direct_path_hangs():
    chosen, started = _timed_race({RELAY: 0.0, MAPPED: float("inf"), LAN: None}, relay_delay=0.6, timeout=10.0)
    assert chosen == RELAY
    assert [c for c, _ in started] == [LAN, MAPPED, RELAY] and 0.55 < started[-1][1] < 1.5, started


def test_the_link_carries_the_relay_but_never_names_it_the_master():
    link = invitation_link("47-8203-1956", "g", ["relay~25.0.0.100:7735", "lan~192.168.11.10:7733"])
    parsed = parse_link(link)
    assert parsed.master == "192.168.11.10:7733"  # old clients dial a direct address, never the relay
    assert [c.kind for c in parsed.via] == [Kind.LAN, Kind.RELAY]
    assert "via=lan~192.168.11.10:7733,relay~25.0.0.100:7735" in link
    only = parse_link(invitation_link("47-8203-1956", "g", ["relay~relay.example:7735"]))
    assert only.master is None and [c.kind for c in only.via] == [Kind.RELAY]


def test_a_link_with_a_relay_pairs_and_serves_through_it_when_nothing_direct_answers(ckpt, tmp_path):
    """The master registers at a relay: its candidates (sealed in the welcome, printed in the link)
    name the relay; a joiner whose direct candidates are dead pairs through the relay by the link
    alone (one pairing attempt), and the worker's race picks the relay (by the group's fingerprint)
    when no direct address answers, the direct address when it does."""
    from worker_core.bridge_host import BridgeState
    from worker_core.bridge_server import BridgeServer
    from worker_core.identity import fingerprint
    from worker_core.worker import pick_path

    async def scenario() -> None:
        relay = BridgeServer()
        await relay.start("127.0.0.1", 0)
        address = f"127.0.0.1:{relay.port}"
        master = Master(paired_config(ckpt, tmp_path / "m", relay=address))
        await master.start()
        try:
            assert master.reach is not None and master.bridge is not None
            port = master.group_port.port
            assert [c.to_text() for c in master.reach.candidates()] == [f"lan~127.0.0.1:{port}", f"relay~{address}"]
            assert f"through relay {address}" in master.reach.summary()
            deadline = time.monotonic() + 20
            while master.bridge.state is not BridgeState.REGISTERED:
                assert time.monotonic() < deadline, master.bridge.last_error
                await asyncio.sleep(0.02)
            code = master.new_code()
            link = build_link(
                JoinLink(
                    code=code,
                    via=(
                        Candidate(Kind.LAN, "127.0.0.1", _dead_port()),
                        Candidate(Kind.RELAY, "127.0.0.1", relay.port),
                    ),
                )
            )
            joined = await pair_with_group(link, None, tmp_path / "w", "alice")
            assert joined.master_host == "" and joined.relay == address  # paired through the relay
            assert f"relay~{address}" in joined.candidates  # sealed in the welcome too
            assert master.invitations._by_nameplate[code.split("-")[0]].attempts == 1  # one pairing attempt
            ident = load_or_create(tmp_path / "w" / "identity", "alice")
            tls, group = client_context(ident, joined.master_cert), fingerprint(joined.master_cert)
            dead = WorkerConfig(
                master="", candidates=(f"lan~127.0.0.1:{_dead_port()}", f"relay~{address}"), tls=tls, group=group
            )
            chosen = await pick_path(dead)
            assert chosen is not None and chosen.kind is Kind.RELAY  # its pinned TLS checked through the splice
            live = WorkerConfig(
                master="", candidates=(f"lan~127.0.0.1:{port}", f"relay~{address}"), tls=tls, group=group
            )
            chosen = await pick_path(live)
            assert chosen is not None and chosen.kind is Kind.LAN
            stranger = load_or_create(tmp_path / "x" / "identity", "x")
            wrong = WorkerConfig(
                master="",
                candidates=(f"relay~{address}",),
                tls=client_context(stranger, stranger.cert_pem),
                group=group,
            )
            assert await pick_path(wrong) is None  # through the relay too, a master that fails the pin is refused
        finally:
            await master.stop()
            await relay.stop()

    run(scenario(), 120)


def test_a_mapped_port_the_relay_reached_from_outside_is_a_verified_candidate():
    """The mapping alone is a candidate; the relay's check marks it verified (``~v`` in the
    link, tried first among its kind) and the summary says what the check found."""
    from types import SimpleNamespace

    from master_core.reach import Reach
    from worker_core.candidates import Kind
    from worker_core.portmap import Mapping

    reach = Reach(7733, "0.0.0.0", map_port=False, relay="25.0.0.100:7735")
    reach.mapper = SimpleNamespace(mapping=Mapping("upnp", 7733, "25.0.0.10", 7733, 3600))
    assert reach.mapped_port() == 7733
    mapped = reach.mapped()
    assert mapped is not None and mapped.kind is Kind.MAPPED and not mapped.verified
    assert reach.summary() == "friends anywhere can join: port 7733 mapped on your router (25.0.0.10:7733)"
    reach.checked(7733, True, "")
    assert reach.mapped().to_text() == "mapped~25.0.0.10:7733~v"
    assert reach.summary().endswith("(25.0.0.10:7733; checked from outside by relay 25.0.0.100:7735)")
    reach.checked(7733, False, "ConnectionRefusedError: refused")
    assert not reach.mapped().verified
    assert "relay 25.0.0.100:7735 could not reach it from outside: ConnectionRefusedError" in reach.summary()
    # a member whose tunnel came from the internet to the mapped address checked it too; one through
    # the router's own NAT loopback (from the LAN), or to another address, did not
    from worker_core.address import MemberPath

    assert not reach.member_came("25.0.0.10:7733", "sofa", MemberPath.LAN)
    assert not reach.member_came("192.168.1.2:7733", "far", MemberPath.DIRECT)
    assert not reach.mapped().verified
    assert reach.member_came("25.0.0.10:7733", "far", MemberPath.DIRECT)
    assert reach.mapped().verified and reach.summary().endswith("(25.0.0.10:7733; checked from outside by member far)")
    assert not reach.member_came("25.0.0.10:7733", "far", MemberPath.DIRECT)  # not news any more
    reach.checked(40000, True, "")  # a check of an older mapping says nothing of this one
    assert not reach.mapped().verified and "checked" not in reach.summary()
    reach.mapper = SimpleNamespace(mapping=Mapping("upnp", 7733, "100.64.0.5", 7733, 3600))  # behind a carrier NAT
    assert reach.mapped_port() == 0 and reach.mapped() is None


def test_a_pinholed_ipv6_address_is_a_candidate_verified_by_a_member_from_outside():
    """The IPv6 pinhole's address replaces the plain IPv6 candidate of that address; a member's
    tunnel that dialled it from a global IPv6 address outside this machine's /64 (so through
    the router's firewall) verifies it; one from inside the /64, or to another address, does not."""
    from types import SimpleNamespace

    from master_core.reach import Reach
    from worker_core.address import MemberPath
    from worker_core.portmap import Mapping
    from worker_core.portmap.pinhole import Pinhole

    reach = Reach(7733, "::", map_port=False)
    own = "2a0f:ff00:0:10::10"
    reach._lan = [Candidate(Kind.LAN, "192.168.10.10", 7733), Candidate(Kind.IPV6, own, 7733)]
    reach.pinholer = SimpleNamespace(current=Pinhole("upnp", own, 7733, 3600, 3), failure="")
    reach.mapper = SimpleNamespace(mapping=None)
    hole = Candidate(Kind.IPV6, own, 7733)
    assert reach.candidates() == [reach._lan[0], hole]
    assert reach.summary().startswith(
        f"friends anywhere with IPv6 can join: pinhole opened on your router for [{own}]:7733"
    )
    dialled = f"[{own}]:7733"
    assert not reach.member_came(dialled, "home", MemberPath.IPV6, peer="2a0f:ff00:0:10::11")  # same /64: the LAN
    assert not reach.member_came("[2a0f:ff00:0:10::99]:7733", "far", MemberPath.IPV6, peer="2a0f:ff00::101")
    assert not reach.member_came(dialled, "far", MemberPath.IPV6)  # where it came from is not known
    assert reach.pinhole() == hole
    assert reach.member_came(dialled, "far", MemberPath.IPV6, peer="2a0f:ff00::101")
    assert reach.candidates()[-1].to_text() == f"ipv6~{dialled}~v"
    assert "checked from outside by member far" in reach.summary()
    assert not reach.member_came(dialled, "far", MemberPath.IPV6, peer="2a0f:ff00::101")  # not news any more
    reach.pinholer = SimpleNamespace(current=None, failure="upnp: UPnP: ... error 606", asked_for=own)
    assert reach.candidates() == reach._lan  # closed: the plain candidate again
    reach.mapper = SimpleNamespace(mapping=Mapping("upnp", 7733, "25.0.0.10", 7733, 3600))
    assert reach.summary() == (
        "friends anywhere can join: port 7733 mapped on your router (25.0.0.10:7733; "
        "no IPv6 pinhole (upnp: UPnP: ... error 606))"
    )
    reach.pinholer = SimpleNamespace(current=None, failure="this machine has no global IPv6 address", asked_for="")
    assert reach.summary() == "friends anywhere can join: port 7733 mapped on your router (25.0.0.10:7733)"
