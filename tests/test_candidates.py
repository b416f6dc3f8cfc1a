"""Candidates end to end on loopback: sealed into the pairing welcome, carried by the join link,
raced to a TLS handshake before pairing (racing burns no attempt) and before each tunnel."""

from __future__ import annotations

import asyncio
import socket

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
from worker_core.worker import pick_master


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
            assert await pick_master(cfg) == f"127.0.0.1:{port}"  # the one whose pinned TLS checks
            stranger = load_or_create(tmp_path / "x" / "identity", "x")
            other = WorkerConfig(
                master=f"127.0.0.1:{port}",
                candidates=(f"lan~127.0.0.1:{port}",),
                tls=client_context(stranger, stranger.cert_pem),  # pins another certificate
            )
            assert await asyncio.wait_for(pick_master(other), 30) == f"127.0.0.1:{port}"  # none checks: given back
        finally:
            await master.stop()

    run(scenario(), 120)
