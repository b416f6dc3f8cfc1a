"""Direct stage-to-stage hops: same tokens as transformers direct or relayed, the relay as the
fallback for every hop that cannot be direct (decided at plan time, or lost while serving),
and a hop listener that lets in only the previous stage (token, pinned certificate, epoch)."""

import asyncio
import gc
import socket

import aiohttp
import pytest
import torch
from aiohttp import web
from harness import Cluster, greedy, paired_group, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.request import SamplingParams
from master_core.scheduler import LOOP_STEPS
from master_core.server import Master
from worker_core import pieces
from worker_core.hops import TOKEN_HEADER, HopListener, HopUnreachable, NextHop, dial
from worker_core.identity import load_or_create
from worker_core.unsent import UNSENT_BYTES
from worker_core.wire import Free, Segment, Step, encode

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], list(range(20, 80))]
NEW = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("hops") / "llama", num_layers=4, seed=3)


@pytest.fixture(scope="module")
def want(ckpt):
    return [reference_greedy(ckpt, p, NEW) for p in PROMPTS]


def _master_bytes(master: Master) -> int:
    return sum(link.bytes_sent + link.bytes_received for link in master.group.stages)


def test_direct_and_relayed_pipelines_give_transformers_tokens_and_direct_spares_the_master(ckpt, want, monkeypatch):
    # frames of more than 1 KiB go in pieces (worker_core.pieces): over the hops, to the master
    monkeypatch.setattr(pieces, "PART_BYTES", 1024)
    cut: list[int] = []
    split = pieces.split

    def counting(frame: bytes, size: int | None = None) -> list[bytes]:
        out = split(frame, size)
        cut.append(len(out))
        return out

    monkeypatch.setattr(pieces, "split", counting)  # what the tunnels' and hops' outboxes cut with

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            g = c.master.group
            start = g.epoch
            assert len(g.hops) == 2 and all(h.direct for h in g.hops), [h.describe() for h in g.hops]
            assert g.loop_back.direct, g.loop_back.describe()
            shown = [m["next_hop"] for m in sorted(g.describe(), key=lambda m: m["stage"])]
            assert shown[0].startswith("direct") and shown[1].startswith("direct")
            assert shown[2].startswith("back to the first stage: direct")
            while not c.engine.profiled:  # the start-up profile is relayed: it measures every link
                await asyncio.sleep(0.01)
            out, spent, looped = {}, {}, {}
            # (direct hops, loop-back): both, relayed, direct only, both again (same group, same caches)
            for mode in ((True, True), (False, False), (True, False), (True, True)):
                c.engine.direct, c.engine.loop_back = mode
                before, tokens, loops = _master_bytes(c.master), c.engine.tokens_generated, c.engine.looped_steps
                got = await asyncio.gather(*(c.engine.generate(p, greedy(NEW)) for p in PROMPTS))
                out.setdefault(mode, []).append([r[0] for r in got])
                spent.setdefault(mode, []).append(
                    (_master_bytes(c.master) - before) / (c.engine.tokens_generated - tokens)
                )
                looped.setdefault(mode, []).append(c.engine.looped_steps - loops)
            assert all(h.direct for h in g.hops), "a hop fell back to the relay without a cause"
            assert g.loop_back.direct, "the loop-back fell back without a cause"
            assert all(link.pending == 0 for link in g.stages), "a fed-back step left an entry behind"
            return out, spent, looped, g.epoch - start

    out, spent, looped, epoch = run(main())
    assert out[(True, True)] == [want, want] and out[(False, False)] == [want] and out[(True, False)] == [want]
    assert epoch == 0
    # fed back without the master only where the loop-back is on
    assert looped[(False, False)] == [0] and looped[(True, False)] == [0] and min(looped[(True, True)]) > 0, looped
    # relayed, each token's hidden states cross the master twice per inner hop; direct, never
    assert max(spent[(True, True)] + spent[(True, False)]) <= 0.5 * spent[(False, False)][0], spent
    assert max(cut) > 1, "no frame went in pieces"


def test_hops_that_cannot_be_direct_are_relayed_with_the_reason_and_answers_stay_identical(ckpt, want):
    # w2 announces an address where nothing listens (a NAT), w3 listens for no hops at all
    options = [{}, {}, {"hop_host": "127.0.0.2"}, {"direct": False}]

    async def main():
        async with Cluster(ckpt, workers=4, worker_options=options) as c:
            g = c.master.group
            names = [s.name for s in g.stages]
            hops = list(g.hops)
            got = await asyncio.gather(*(c.engine.generate(p, greedy(NEW)) for p in PROMPTS))
            return names, hops, [r[0] for r in got]

    names, hops, got = run(main())
    assert got == want
    assert len(hops) == 3
    for i, hop in enumerate(hops):
        a, b = names[i], names[i + 1]
        if b == "w3":
            assert not hop.direct and "w3 takes no inbound hops" in hop.reason, hop.reason
        elif a == "w3":
            assert not hop.direct and "w3: direct hops are off" in hop.reason, hop.reason
        elif b == "w2":  # measured at plan time: the dial to 127.0.0.2 finds nobody
            assert not hop.direct and "127.0.0.2" in hop.reason, hop.reason
        else:
            assert hop.direct, hop.reason
    # the placement decides the order; whenever it leaves a pair of ordinary stages side by side, that hop is direct
    possible = any(names[i] != "w3" and names[i + 1] not in ("w2", "w3") for i in range(3))
    assert any(h.direct for h in hops) == possible and not all(h.direct for h in hops)


def test_a_worker_that_only_dials_hops_onward_directly_and_is_fed_through_the_relay(ckpt, want, monkeypatch):
    # w2 opens no port (the Windows app's worker: no firewall prompt) but still dials its next stage
    import worker_core.worker

    # equal measured speed and memory, joined one after the other: the placement's order is then its
    # tie-break (join order), not the noise of a 0.2 s matmul or of who dialled first
    monkeypatch.setattr(worker_core.worker, "matmul_gflops", lambda info, seconds: 50.0)
    same = {"memory_limit": 4 << 30}

    async def main():
        async with Cluster(ckpt, workers=0, min_workers=3) as c:
            g = c.master.group
            for i, extra in enumerate([{}, {}, {"hop_listen": False}]):
                c.add_worker(f"w{i}", **same, **extra)
                while len(g.links) <= i:
                    await asyncio.sleep(0.01)
            await c.settled(3)
            w2 = next(s for s in g.stages if s.name == "w2")
            names, hops = [s.name for s in g.stages], list(g.hops)
            got = await asyncio.gather(*(c.engine.generate(p, greedy(NEW)) for p in PROMPTS))
            return w2.hello.hop_port, names, hops, [r[0] for r in got]

    port, names, hops, got = run(main())
    assert got == want and port == 0
    # equal members: the first and the second to join take the ends, the third the middle
    assert names[1] == "w2", f"the test needs w2 in the middle; the placement chose {names}"
    assert not hops[0].direct and "w2 takes no inbound hops" in hops[0].reason, hops[0].reason
    assert hops[1].direct, hops[1].reason


LONG_PROMPTS = [list(range(30, 40)), list(range(50, 53))]


def _break_a_hop_mid_generation(
    ckpt, breaks, loop_back: bool = False, inner: bool = True, shift: int = 0
) -> tuple[list[list[int]], list, int, int, int, int]:
    """3 direct stages; once 20 tokens are out, ``await breaks(hop)`` on one live direct hop (an
    inner one, or else the last stage's hop back to the first; ``loop_back``: the last stage
    feeds its tokens back meanwhile), then let both long answers finish: (tokens, hops at the
    end and the loop-back, epoch changes, workers lost, stale results, steps replayed).
    ``shift`` requests are submitted and cancelled first, so request ids and KV ids differ."""

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            g = c.master.group
            start, links = g.epoch, len(g.links)
            assert all(h.direct for h in g.hops) and g.loop_back.direct
            c.engine.loop_back = loop_back
            while not c.engine.profiled:
                await asyncio.sleep(0.01)
            for _ in range(shift):  # cancelled while queued: they take a request id, never a KV id
                c.engine.cancel(c.engine.submit([1, 2], greedy(1)))
            gens = [asyncio.create_task(c.engine.generate(p, greedy(96))) for p in LONG_PROMPTS]
            while c.engine.tokens_generated < 20:
                await asyncio.sleep(0.005)
            assert not any(t.done() for t in gens), "generation ended before the hop could break"
            first = g.stages[0].hello.hop_port  # the loop-back dials the first stage's listener
            hops = [o for o in gc.get_objects() if type(o) is NextHop and o.down is None]
            assert len(hops) == 3
            await breaks(next(h for h in hops if (h._ws._response.url.port == first) != inner))
            got = await asyncio.wait_for(asyncio.gather(*gens), 120)
            hops_then = [*g.hops, g.loop_back]
            e = c.engine
            return (
                [r[0] for r in got],
                hops_then,
                g.epoch - start,
                links - len(g.links),
                e.stale_results,
                e.replays,
                e.kv.resumed,
            )

    return run(main())


def test_a_hop_lost_while_serving_falls_back_to_the_relay_without_a_replay(ckpt):
    async def close(hop: NextHop) -> None:  # the path between two stages breaks mid-generation
        await hop._ws.close()

    got, hops, epoch, _, stale, replays, _ = _break_a_hop_mid_generation(ckpt, close)
    assert got == [reference_greedy(ckpt, p, 96) for p in LONG_PROMPTS]
    assert epoch == 0 and stale == 0 and replays == 0, "the fallback re-planned or replayed"
    assert sum(not h.direct for h in hops[:2]) == 1 and hops[2].direct, [h.describe() for h in hops]
    assert "could not send on directly" in next(h.reason for h in hops if not h.direct)


def test_an_inner_hop_lost_under_the_loop_back_continues_each_request_under_its_kv_id(ckpt):
    """A fed-back step that stops at a broken inner hop is continued by the master relayed: its
    segments must name the requests' KV ids (here not their request ids), or the next stage
    misses them (a replay) or, worse, writes into another request's cache."""

    async def close(hop: NextHop) -> None:
        await hop._ws.close()

    got, hops, epoch, _, stale, replays, _ = _break_a_hop_mid_generation(ckpt, close, loop_back=True, shift=5)
    assert got == [reference_greedy(ckpt, p, 96) for p in LONG_PROMPTS]
    assert epoch == 0 and stale == 0 and replays == 0, (epoch, stale, replays)
    assert sum(not h.direct for h in hops[:2]) == 1, [h.describe() for h in hops]


def test_a_loop_back_lost_while_serving_hands_the_steps_back_to_the_master(ckpt):
    async def close(hop: NextHop) -> None:  # the path from the last stage back to the first breaks
        await hop._ws.close()

    got, hops, epoch, _, _, replays, resumed = _break_a_hop_mid_generation(ckpt, close, loop_back=True, inner=False)
    assert got == [reference_greedy(ckpt, p, 96) for p in LONG_PROMPTS]
    assert epoch == 0, "a lost loop-back re-planned the group"
    # the step the last stage could not feed back ran nowhere: its requests go on from what
    # every stage holds, not from token 0
    assert replays == 0 and resumed > 0, (replays, resumed)
    assert all(h.direct for h in hops[:2]), [h.describe() for h in hops]
    assert not hops[2].direct and "cannot loop back" in hops[2].reason, hops[2].describe()


def test_paired_members_hop_directly_over_pinned_mutual_tls(ckpt, want, tmp_path):
    async def main():
        async with paired_group(ckpt, tmp_path) as master:
            hops = list(master.group.hops)
            got = await asyncio.gather(*(master.engine.generate(p, greedy(NEW)) for p in PROMPTS))
            return hops, [r[0] for r in got]

    hops, got = run(main(), 240)
    assert len(hops) == 1 and hops[0].direct, hops[0].describe()
    assert got == want


def test_a_hop_listener_lets_in_only_the_previous_stage_of_the_current_epoch(tmp_path):
    me, prev, stranger = (load_or_create(tmp_path / n, n) for n in ("me", "prev", "stranger"))
    token = "ab" * 16
    step = Step(9, 1, (Segment(1, 0, 2, False),), torch.zeros(2, 8))

    async def main():
        listener = HopListener(me)
        got: list[Step] = []
        listener.sink = got.append
        await listener.start("127.0.0.1")
        address = f"127.0.0.1:{listener.port}"
        outcomes = {}
        try:
            try:
                await dial(address, 1, token, me.cert_pem, prev)
            except HopUnreachable as e:
                outcomes["before any route"] = str(e)
            listener.accept(1, token, prev.cert_pem)
            for name, args in {
                "wrong token": (address, 1, "cd" * 16, me.cert_pem, prev),
                "stranger's certificate": (address, 1, token, me.cert_pem, stranger),
                "listener not the pinned one": (address, 1, token, stranger.cert_pem, prev),
            }.items():
                try:
                    hop, _ = await dial(*args)
                    await hop.close()
                except HopUnreachable as e:
                    outcomes[name] = str(e)
            hop, _ = await dial(address, 1, token, me.cert_pem, prev)
            sock = hop._ws.get_extra_info("socket")  # under TLS: the TCP socket it runs on
            outcomes["unsent bytes kept"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            fallbacks: list[int] = []

            async def relayed() -> None:
                fallbacks.append(1)

            await hop.send(step, relayed)
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            # a frame that is not a Step of this epoch closes the hop (a protocol error)
            await hop._ws.send_bytes(encode(Free((1,))))
            for _ in range(200):
                if hop.down is not None:
                    break
                await asyncio.sleep(0.01)
            await hop.send(step, relayed)  # down: goes back to the master instead
            down = hop.down
            await hop.close()
            # a plain (tokenless) WebSocket client gets 403, not a hop
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError):
                    await http.ws_connect(f"https://{address}/v1/hop", ssl=False, headers={TOKEN_HEADER: token})
            return outcomes, got, fallbacks, down
        finally:
            await listener.stop()

    outcomes, got, fallbacks, down = run(main(), 60)
    # the hop's kernel keeps few bytes unsent: a decode frame passes queued pieces (worker_core.unsent)
    assert outcomes.pop("unsent bytes kept") == UNSENT_BYTES
    assert set(outcomes) == {
        "before any route",
        "wrong token",
        "stranger's certificate",
        "listener not the pinned one",
    }, outcomes
    assert "refused" in outcomes["wrong token"]
    assert len(got) == 1 and got[0].step_id == 9 and torch.equal(got[0].tensor, step.tensor)
    assert fallbacks == [1] and down is not None


def test_the_master_dials_a_hop_at_the_announced_host_the_lan_address_the_mapping_or_the_address_it_sees():
    from master_core.link import WorkerLink
    from master_core.routes import hop_address
    from worker_core.wire import Hello

    def link(peer: str, **hello) -> WorkerLink:
        # no tunnel (None): the test reads the link's hop addresses only, nothing is ever sent on it
        return WorkerLink(None, Hello("w", "cpu", "cpu", 1, 1, "float32", **hello), peer, 1 << 20)

    home_a = link("203.0.113.5", hop_port=7734, hop_lan="192.168.1.20")
    home_a2 = link("203.0.113.5", hop_port=7734, hop_lan="192.168.1.21")
    home_b = link("198.51.100.7", hop_port=7734, hop_lan="10.0.0.4")
    assert hop_address(home_a, home_a2) == "192.168.1.20:7734"  # same home: its LAN address
    assert hop_address(home_a, home_b) == "203.0.113.5:7734"  # elsewhere: the address the master sees
    assert hop_address(link("203.0.113.5", hop_port=7000, hop_host="me.example.org"), home_a2) == "me.example.org:7000"
    assert hop_address(link("2001:db8::1", hop_port=7734), home_b) == "[2001:db8::1]:7734"
    assert hop_address(link("203.0.113.5"), home_a) == ""  # no listener
    # where its home router maps the hop port (Routed.mapped): dialled from another home, not from the same one
    assert hop_address(home_a, home_b, "203.0.113.5:40001") == "203.0.113.5:40001"
    assert hop_address(home_a, home_a2, "203.0.113.5:40001") == "192.168.1.20:7734"
    relayed = link("bridge:25.0.0.100:7735#2", hop_port=7734, hop_lan="192.168.1.30")  # no address seen
    assert hop_address(relayed, home_b) == "" and hop_address(relayed, home_b, "25.0.0.12:7734") == "25.0.0.12:7734"


def test_a_step_lost_on_a_hop_that_died_quietly_is_replayed_relayed_and_no_worker_is_dropped(ckpt, monkeypatch):
    import master_core.link

    monkeypatch.setattr(master_core.link, "STEP_DEADLINE_FLOOR", 1.5)  # steps here take milliseconds

    async def black_hole(hop: NextHop) -> None:  # the path swallows frames; the socket looks fine
        async def swallow(frame: bytes) -> None:
            return None

        hop._ws.send_bytes = swallow  # type: ignore[method-assign]  # the test drops the hop's frames on purpose

    got, hops, epochs, links, _, _, _ = _break_a_hop_mid_generation(ckpt, black_hole)
    assert got == [reference_greedy(ckpt, p, 96) for p in LONG_PROMPTS]
    assert epochs == 0 and links == 0, "a worker was dropped for a hop's fault"
    relayed = [h for h in hops if not h.direct]
    assert relayed and all("got no answer" in h.reason for h in relayed), [h.describe() for h in hops]


def test_a_request_arriving_while_the_last_stage_loops_back_is_served_at_once(ckpt):
    """A looping micro-batch takes no lane slot: another lane admits and serves an arrival while
    the loop runs (it would otherwise wait for up to LOOP_STEPS of the running stream's steps)."""

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            while not c.engine.profiled:
                await asyncio.sleep(0.01)
            long = c.engine.submit([5, 6, 7], greedy(400))
            waits = []
            for _ in range(4):
                while len(long.output) < 20 + 40 * len(waits):
                    await asyncio.sleep(0.001)
                before = len(long.output)
                short = c.engine.submit([40 + len(waits), 41], greedy(1))
                await asyncio.wait_for(short.events.get(), 30)
                waits.append(len(long.output) - before)
            looped = c.engine.looped_steps
            c.engine.cancel(long)
            return waits, looped

    waits, looped = run(main())
    assert looped > 0
    assert max(waits) <= 4, f"arrivals waited {waits} tokens of the looping stream (a loop is {LOOP_STEPS} steps)"


def test_a_lane_counts_as_prefill_until_its_prompts_step_is_back_not_through_its_loop(ckpt):
    """The engine keeps at most ``prefill_lanes`` micro-batches carrying prefill in flight.  A
    lane whose first step carried a prompt's last chunk and then loops back counts among them
    while that step is on its way, and no longer once it is back: the steps it loops carry no
    prefill (it held new prompt chunks back for its whole loop before)."""

    async def main() -> list[tuple[int, int, int]]:
        async with Cluster(ckpt, workers=3) as c:
            while not c.engine.profiled:
                await asyncio.sleep(0.01)
            seen: list[tuple[int, int, int]] = []  # (tokens out, lanes carrying prefill, lanes looping)
            req = c.engine.submit(PROMPTS[0], greedy(3 * LOOP_STEPS))
            while not req.finished:
                seen.append((len(req.output), c.engine._prefilling_lanes, c.engine._looping_lanes))
                await asyncio.sleep(0.0005)
            return seen

    seen = run(main())
    assert any(out == 0 and pre == 1 for out, pre, _ in seen), "the prompt's step was never counted as prefill"
    looping = [pre for out, pre, loops in seen if out > 1 and loops]
    assert looping, "no loop was seen"
    assert not any(looping), f"a looping lane counted as prefill in {sum(looping)} of {len(looping)} looks"


def test_sampled_requests_loop_back_too_and_draw_what_the_master_would(ckpt, want):
    """The last stage draws sampled tokens with the request's seed, position by position, as the
    master does: the same seeded requests give the same tokens with the loop-back on and off."""
    params = [SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)]

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            while not c.engine.profiled:
                await asyncio.sleep(0.01)
            out, looped = [], []
            for on in (True, False, True):
                c.engine.loop_back = on
                before = c.engine.looped_steps
                got = await asyncio.gather(*(c.engine.generate(p, sp) for p, sp in zip(PROMPTS, params)))
                out.append([r[0] for r in got])
                looped.append(c.engine.looped_steps - before)
            return out, looped

    out, looped = run(main())
    assert out[0] == out[1] == out[2], "the loop-back drew other tokens than the master"
    assert looped[0] > 0 and looped[1] == 0 and looped[2] > 0, looped
    assert out[0] != want, "these tokens are not sampled"


def test_a_listener_binds_both_families_on_one_port_and_a_hop_dials_it_over_ipv6(tmp_path):
    """``"::"`` is IPv4 and IPv6 on one port (asyncio alone makes an IPv6 listener IPv6-only):
    the shared binding (:mod:`worker_core.listen`, used by the group port and the hop
    listeners) starts one site per family on the port the first got.  Loopback here (servers in
    tests bind loopback only); the lab test binds ``::`` across real network stacks.  A paired
    hop listener then takes a hop dialled at an IPv6 address in brackets."""
    from worker_core.listen import bind, families

    assert families("::") == ("0.0.0.0", "::") and families("10.0.0.2") == ("10.0.0.2",)
    me, prev = (load_or_create(tmp_path / n, n) for n in ("me", "prev"))
    token = "ab" * 16
    step = Step(9, 1, (Segment(1, 0, 2, False),), torch.zeros(2, 8))

    async def both() -> tuple[int, list[str]]:
        async def hello(_: web.Request) -> web.Response:
            return web.Response(text="hi")

        app = web.Application()
        app.add_routes([web.get("/", hello)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            port = await bind(runner, ("127.0.0.1", "::1"), 0, None, "test listener")
            async with aiohttp.ClientSession() as http:
                said = [await (await http.get(f"http://{h}:{port}/")).text() for h in ("127.0.0.1", "[::1]")]
            return port, said
        finally:
            await runner.cleanup()

    async def hop_over_ipv6() -> list[Step]:
        listener = HopListener(me)
        got: list[Step] = []
        listener.sink = got.append
        await listener.start("::1")
        try:
            listener.accept(1, token, prev.cert_pem)
            hop, _ = await dial(f"[::1]:{listener.port}", 1, token, me.cert_pem, prev)

            async def relayed() -> None:
                raise AssertionError("the hop went down")

            await hop.send(step, relayed)
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            await hop.close()
            return got
        finally:
            await listener.stop()

    port, said = run(both(), 30)
    assert port > 0 and said == ["hi", "hi"]
    got = run(hop_over_ipv6(), 30)
    assert len(got) == 1 and got[0].step_id == 9
