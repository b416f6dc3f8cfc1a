"""Hops through a relay: a stage reaches its next stage through the group's relay when no direct
address answers, instead of sending every activation through the master.

Each member's hop listener registers at the relay under its own certificate; the master names
the relay in the ``Route``; the hop's TLS (pinned to the next stage's certificate, the token
checked) runs end to end over the relay's splice, which sees TLS records only.  A relay that
goes away sends the hop back through the master with the same tokens, and registrations heal
when it comes back; a dial for a member that is not registered, or whose registration another
process took, is refused by the relay or by the listener, never let through."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import torch
from harness import greedy, paired_group, run
from test_bridge_group import tapped_relay, tls_records
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.server import Master
from worker_core.bridge_host import BridgeHost, BridgeState
from worker_core.bridge_server import BridgeServer
from worker_core.hops import TOKEN_HEADER, HopListener, HopUnreachable, dial
from worker_core.identity import load_or_create
from worker_core.wire import Segment, Step

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
NEW = 16
# members behind NATs nobody dials into: each announces a host where nothing listens for it
# (its listener is bound to 127.0.0.1 alone), so a direct dial is refused at once
BEHIND_NAT = {"hop_host": "127.0.0.2"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("hoprelay") / "llama", num_layers=4, seed=7)


@pytest.fixture(scope="module")
def want(ckpt):
    return [reference_greedy(ckpt, p, NEW) for p in PROMPTS]


async def _until(check, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


def _master_bytes(master: Master) -> int:
    return sum(link.bytes_sent + link.bytes_received for link in master.group.stages)


def test_members_behind_nats_hop_through_the_relay_which_sees_only_tls_and_tokens_stay_identical(ckpt, want, tmp_path):
    captured: dict[tuple[str, str], bytearray] = {}

    async def main():
        relay = await tapped_relay(captured)
        address = f"127.0.0.1:{relay.port}"
        try:
            async with paired_group(ckpt, tmp_path, worker={"relay": address, **BEHIND_NAT}) as m:
                g = m.group
                hops, loop_back = list(g.hops), g.loop_back
                relays = {link.hello.hop_relay for link in g.stages}
                await _until(lambda: m.engine.profiled, 60, "the start-up profile (relayed: it measures every link)")
                out, through_relay, through_master = {}, {}, {}
                # through the relay, then every hop through the master (the unrelayed run), then again
                for direct in (True, False, True):
                    m.engine.direct = direct
                    spliced, relayed = relay.bytes_spliced, _master_bytes(m)
                    got = await asyncio.gather(*(m.engine.generate(p, greedy(NEW)) for p in PROMPTS))
                    out.setdefault(direct, []).append([r[0] for r in got])
                    through_relay.setdefault(direct, []).append(relay.bytes_spliced - spliced)
                    through_master.setdefault(direct, []).append(_master_bytes(m) - relayed)
                still = [h.describe() for h in g.hops]
            return hops, loop_back, relays, out, through_relay, through_master, still, address
        finally:
            await relay.stop()

    hops, loop_back, relays, out, through_relay, through_master, still, address = run(main(), 240)
    assert relays == {address}, relays
    assert len(hops) == 1 and hops[0].direct and hops[0].through == address, hops[0].describe()
    assert not hops[0].one_link  # counted by the cost model as two links, like a hop through the master
    assert hops[0].describe().startswith(f"through relay {address}"), hops[0].describe()
    assert loop_back.direct and loop_back.through == address, loop_back.describe()
    assert still == [hops[0].describe()], still  # nothing fell back while serving
    assert out[True] == [want, want] and out[False] == [want]  # relayed hop or the master: same tokens
    # the activations crossed the relay, not the master: through the master the same work costs it
    # far more, and the relay carries next to nothing (heartbeats)
    assert min(through_relay[True]) > 4 * max(1, through_relay[False][0]), through_relay
    assert max(through_master[True]) < 0.5 * through_master[False][0], through_master
    # every spliced byte is a TLS record; no frame, header or prompt is readable in them
    assert captured, "nothing was spliced"
    plain = [struct.pack(f"<{len(p)}q", *p) for p in PROMPTS] + [b"/v1/hop", TOKEN_HEADER.encode(), b"websocket"]
    for (session, direction), data in captured.items():
        kinds = tls_records(bytes(data))
        assert kinds[0] == 22, (session, direction, kinds[:3])
        for p in plain:
            assert p not in data, f"{p[:16]!r} crossed the relay in the clear ({session} {direction})"


def test_a_relay_that_goes_away_mid_run_sends_the_hop_through_the_master_and_registrations_heal(ckpt, tmp_path):
    prompts = [list(range(30, 40)), list(range(50, 53))]
    new = 64

    async def main():
        relay = BridgeServer()
        await relay.start("127.0.0.1", 0)
        port = relay.port
        address = f"127.0.0.1:{port}"
        again: BridgeServer | None = None
        try:
            async with paired_group(ckpt, tmp_path, worker={"relay": address, **BEHIND_NAT}) as m:
                g = m.group
                before = g.hops[0].describe()
                members = {link.cert for link in g.stages}
                gens = [asyncio.create_task(m.engine.generate(p, greedy(new))) for p in prompts]
                await _until(lambda: m.engine.tokens_generated >= 12, 60, "12 tokens")
                assert not any(t.done() for t in gens), "generation ended before the relay went away"
                await relay.stop()
                got = await asyncio.wait_for(asyncio.gather(*gens), 120)
                after = g.hops[0].describe()
                # the relay comes back on its port: both members register again by themselves
                again = BridgeServer()
                await again.start("127.0.0.1", port)
                await _until(lambda: len(again.groups) == 2, 40, "both members registered again")
                return before, after, [r[0] for r in got], g.epoch, len(g.stages), members, set(again.groups)
        finally:
            await relay.stop()
            if again is not None:
                await again.stop()

    before, after, got, epoch, stages, members, registered = run(main(), 300)
    assert before.startswith("through relay"), before
    assert got == [reference_greedy(ckpt, p, new) for p in prompts]
    assert after.startswith("relayed:"), after  # the hop went down: the master carries it now
    assert stages == 2
    from worker_core.identity import fingerprint

    assert registered == {fingerprint(c) for c in members}, registered


def test_a_hop_through_the_relay_reaches_only_the_registered_pinned_listener(tmp_path):
    me, prev, stranger = (load_or_create(tmp_path / n, n) for n in ("me", "prev", "stranger"))
    token = "ab" * 16
    step = Step(9, 1, (Segment(1, 0, 2, False),), torch.zeros(2, 8))

    async def main():
        relay = BridgeServer()
        await relay.start("127.0.0.1", 0)
        address = f"127.0.0.1:{relay.port}"
        first, second = HopListener(me), HopListener(me)
        got: list[Step] = []
        first.sink = got.append
        for listener in (first, second):
            await listener.start("127.0.0.1")
        hosts: list[BridgeHost] = []
        outcomes: dict[str, str] = {}

        async def refused(name: str, *args, **kw) -> None:
            t0 = time.monotonic()
            try:
                hop, _ = await dial(*args, **kw)
                await hop.close()
                outcomes[name] = "opened"
            except HopUnreachable as e:
                outcomes[name] = f"{e} ({time.monotonic() - t0:.1f} s)"

        try:
            # not registered (yet): the relay refuses at once
            await refused("unregistered", "", 1, token, me.cert_pem, prev, relay=address)
            await refused("direct refused, unregistered", "127.0.0.1:1", 1, token, me.cert_pem, prev, relay=address)
            hosts.append(BridgeHost(address, me, list, first.accept_bridged))
            await hosts[0].start()
            await _until(lambda: hosts[0].state is BridgeState.REGISTERED, what=hosts[0].last_error)
            await refused("before any route", "", 1, token, me.cert_pem, prev, relay=address)
            first.accept(1, token, prev.cert_pem)
            await refused("wrong token", "", 1, "cd" * 16, me.cert_pem, prev, relay=address)
            await refused("stranger's certificate", "", 1, token, me.cert_pem, stranger, relay=address)
            hop, _ = await dial("", 1, token, me.cert_pem, prev, relay=address)
            fallbacks: list[int] = []

            async def through_master() -> None:
                fallbacks.append(1)

            await hop.send(step, through_master)
            await _until(lambda: bool(got), what="the step through the relay")
            # another process with the same certificate registers: it takes the calls from now on,
            # the first is told so and keeps away (no tug of war), and the open hop is not cut
            hosts.append(BridgeHost(address, me, list, second.accept_bridged))
            await hosts[1].start()
            await _until(lambda: hosts[1].state is BridgeState.REGISTERED, what=hosts[1].last_error)
            await _until(lambda: hosts[0].state is BridgeState.BACKING_OFF, what="the first told it was replaced")
            await refused("registration replaced", "", 1, token, me.cert_pem, prev, relay=address)
            await asyncio.sleep(1.5)  # a first registration that came straight back would have taken over by now
            still_second = hosts[0].state is BridgeState.BACKING_OFF and hosts[1].state is BridgeState.REGISTERED
            await hop.send(step, through_master)
            await _until(lambda: len(got) == 2, what="the second step on the hop opened before")
            down = hop.down
            await hop.close()
            return outcomes, hosts[0].last_error, still_second, down, fallbacks, relay.stats() | {"port": relay.port}
        finally:
            for h in hosts:
                await h.stop()
            for listener in (first, second):
                await listener.stop()
            await relay.stop()

    outcomes, replaced_why, still_second, down, fallbacks, stats = run(main(), 90)
    assert "unknown_group" in outcomes["unregistered"], outcomes
    assert float(outcomes["unregistered"].rsplit("(", 1)[1].split()[0]) < 2.0, outcomes  # at once, not a timeout
    direct_failed, relay_failed = outcomes["direct refused, unregistered"].split("; through relay ")
    assert direct_failed.startswith("127.0.0.1:1:") and "unknown_group" in relay_failed, outcomes
    assert "refused (not the pipeline's previous stage)" in outcomes["wrong token"], outcomes
    # a listener that accepts nobody (no route yet; the process that took the registration) and a
    # dialler with another certificate fail the pinned TLS handshake, through the relay as directly
    for name in ("before any route", "registration replaced", "stranger's certificate"):
        assert outcomes[name].startswith(f"through relay 127.0.0.1:{stats['port']}: "), (name, outcomes[name])
    assert "replaced" in replaced_why, replaced_why
    assert still_second
    assert down is None and fallbacks == [], (down, fallbacks)
    assert stats["sessions_spliced"] >= 6, stats


def test_a_worker_holding_the_masters_certificate_keeps_its_hop_listener_off_the_relay(tmp_path):
    """Registering it would replace the master's own registration (the group's fingerprint)."""
    import dataclasses

    from worker_core.identity import client_context
    from worker_core.worker import WorkerConfig, _hop_bridge

    ident = load_or_create(tmp_path / "m", "m")

    async def main():
        relay = BridgeServer()
        await relay.start("127.0.0.1", 0)
        listener = HopListener(ident)
        await listener.start("127.0.0.1")
        member = None
        try:
            cfg = WorkerConfig(
                master="", tls=client_context(ident, ident.cert_pem), identity=ident,
                relay=f"127.0.0.1:{relay.port}", group=ident.fingerprint,
            )  # fmt: skip
            same = await _hop_bridge(listener, cfg)
            member = await _hop_bridge(listener, dataclasses.replace(cfg, group="ab" * 32))
            assert member is not None
            await _until(lambda: member.state is BridgeState.REGISTERED, what=member.last_error)
            return same, set(relay.groups)
        finally:
            if member is not None:
                await member.stop()
            await listener.stop()
            await relay.stop()

    same, registered = run(main(), 60)
    assert same is None
    assert registered == {ident.fingerprint}  # the same listener as a member's: registered


def test_a_relayed_hop_moves_to_the_direct_path_once_one_answers_and_only_when_quiet(ckpt, want, tmp_path, monkeypatch):
    """Members whose announced hop addresses answer nobody hop through the relay.  Once those
    addresses answer (a port forwarding that opens later, as a router's mapping would), each
    relayed hop moves onto its direct path by itself, not while steps cross it, and the master
    describes and costs it as direct; tokens stay identical and the relay then carries nothing
    but heartbeats."""
    from app.tools.netlab.tcp_proxy import TcpProxy
    from worker_core import session

    monkeypatch.setattr(session, "DIRECT_RETRY", 0.2)
    monkeypatch.setattr(session, "MOVE_QUIET", 1.5)

    async def main():
        relay = BridgeServer()
        await relay.start("127.0.0.1", 0)
        address = f"127.0.0.1:{relay.port}"
        proxies: list[TcpProxy] = []
        try:
            async with paired_group(ckpt, tmp_path, worker={"relay": address, **BEHIND_NAT}) as m:
                g = m.group
                before = [h.describe() for h in (*g.hops, g.loop_back)]
                first = [r[0] for r in await asyncio.gather(*(m.engine.generate(p, greedy(NEW)) for p in PROMPTS))]
                for link in g.stages:  # the announced addresses start answering
                    port = link.hello.hop_port
                    proxies.append(TcpProxy("127.0.0.1", port, listen_port=port, listen_host="127.0.0.2"))
                    await proxies[-1].start()
                # steps keep crossing the relayed hops: they stay where they are meanwhile
                busy = [r[0] for r in await asyncio.gather(*(m.engine.generate(p, greedy(48)) for p in PROMPTS))]
                during = [h.describe() for h in (*g.hops, g.loop_back)]
                await _until(lambda: not g.hops[0].through and not g.loop_back.through, 60, "the hops moved")
                after = [h for h in (*g.hops, g.loop_back)]
                spliced = relay.bytes_spliced
                last = [r[0] for r in await asyncio.gather(*(m.engine.generate(p, greedy(NEW)) for p in PROMPTS))]
                return before, first, busy, during, after, last, relay.bytes_spliced - spliced, proxies
        finally:
            for p in proxies:
                await p.close()
            await relay.stop()

    before, first, busy, during, after, last, spliced, proxies = run(main(), 240)
    assert all(d.startswith("through relay 127.0.0.1:") for d in before), before
    assert during == before, during  # never while steps crossed them
    assert all(h.direct and h.one_link for h in after), [h.describe() for h in after]
    assert first == last == want
    assert busy == [reference_greedy(ckpt, p, 48) for p in PROMPTS]
    assert all(p.accepted >= 1 and p.bytes_up > 0 for p in proxies)
    assert spliced < 4096, spliced  # the activations no longer cross the relay
