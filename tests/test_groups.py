"""Paired groups: pairing codes, mutual-TLS tunnels, revocation, pinning, mDNS, and the
whole story through the command line (create, two joins, two workers, a chat answer)."""

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from harness import join_member, output_line, paired_config, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from master_core.invitations import MAX_FAILURES, TTL, Invitations, InvitationState
from master_core.server import Master
from worker_core.identity import client_context, load_or_create
from worker_core.pairing import (
    Malformed,
    NotACode,
    PairingSession,
    Refused,
    UnknownCode,
    Unreachable,
    WrongCode,
    join,
    parse_code,
    refusal,
)
from worker_core.unsent import UNSENT_BYTES
from worker_core.worker import WorkerConfig, serve


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), num_layers=4)


# ---------------------------------------------------------------- codes and the PAKE, pure


def test_codes_are_single_use_expire_and_burn_after_five_failures():
    inv = Invitations()
    code = inv.issue(now=0.0)
    nameplate, normalised = parse_code(code.replace("-", " "))
    assert normalised == code and len(code.replace("-", "")) == 10
    assert inv.begin(nameplate, now=1.0) == code
    inv.succeed(nameplate)
    with pytest.raises(Refused, match="already used"):
        inv.begin(nameplate, now=2.0)

    code = inv.issue(now=0.0)
    nameplate = code[:2]
    with pytest.raises(Refused, match="expired"):
        inv.begin(nameplate, now=TTL + 1)

    code = inv.issue(now=0.0)
    nameplate = code[:2]
    for _ in range(MAX_FAILURES):
        inv.begin(nameplate, now=1.0)
        inv.fail(nameplate)
    assert inv.state(nameplate) is InvitationState.BURNED
    with pytest.raises(Refused, match="burned"):
        inv.begin(nameplate, now=2.0)  # the 6th attempt, even with the right code
    with pytest.raises(UnknownCode, match="no such"):
        inv.begin("00", now=2.0)
    for bad in ("", "12-34", "abcdefghij", "01-2345-6789", "12-3456-78901"):
        with pytest.raises(NotACode):
            parse_code(bad)


def test_a_masters_error_code_picks_the_type_and_unknown_codes_are_refusals():
    assert type(refusal("unknown_code", "x")) is UnknownCode and type(refusal("wrong_code", "x")) is WrongCode
    assert type(refusal("malformed", "x")) is Malformed and type(refusal("refused", "x")) is Refused
    for other in (None, 3, "unreachable", "something new"):
        assert type(refusal(other, "the master refused: why")) is Refused
    assert str(refusal("unknown_code", "the master refused: no such code")) == "the master refused: no such code"


def test_pake_confirms_only_with_the_same_code():
    a, b = PairingSession("47-1234-5678", master=False), PairingSession("47-1234-5678", master=True)
    a.finish(b.outbound)
    b.finish(a.outbound)
    assert a.check_peer_confirmation(b.confirmation()) and b.check_peer_confirmation(a.confirmation())
    assert b.open(a.seal({"x": 1})) == {"x": 1}
    c, d = PairingSession("47-1234-5678", master=False), PairingSession("47-1234-5679", master=True)
    c.finish(d.outbound)
    d.finish(c.outbound)
    assert not c.check_peer_confirmation(d.confirmation()) and not d.check_peer_confirmation(c.confirmation())
    with pytest.raises(Malformed):
        d.open(c.seal({"x": 1}))


# ---------------------------------------------------------------- a paired master in process


async def _raw_tls(port: int, ctx: ssl.SSLContext) -> bytes:
    """Open TLS with ``ctx`` (server name of member tunnels), send a bare request, return the
    first bytes answered; a refused handshake raises or reads nothing."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="molink"), 10
    )
    try:
        writer.write(b"GET /v1/tunnel HTTP/1.1\r\nHost: molink\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(64), 10)
    finally:
        writer.close()


def test_pairing_right_wrong_burned_expired_over_the_network(ckpt, tmp_path):
    async def main():
        master = Master(paired_config(ckpt, tmp_path / "m"))
        await master.start()
        try:
            port = master.group_port.port
            me = load_or_create(tmp_path / "a" / "identity", "alice")
            code = master.new_code()
            wrong = code[:-1] + ("0" if code[-1] != "0" else "1")
            with pytest.raises(WrongCode, match="wrong pairing code"):
                await join("127.0.0.1", port, wrong, "alice", me.cert_pem)
            joined = await join("127.0.0.1", port, code, "alice", me.cert_pem)
            assert joined.name == "alice" and joined.master_cert == master.members.identity.cert_pem
            assert [m.name for m in master.members.members()] == ["alice"]
            with pytest.raises(Refused, match="already used"):
                await join("127.0.0.1", port, code, "alice", me.cert_pem)
            with pytest.raises(UnknownCode, match="no such pairing code"):
                await join("127.0.0.1", port, "99-0000-0000" if code[:2] != "99" else "98-0000-0000", "x", me.cert_pem)

            code = master.new_code()
            bad = code[:-1] + ("0" if code[-1] != "0" else "1")
            for _ in range(MAX_FAILURES):
                with pytest.raises(WrongCode, match="wrong pairing code"):
                    await join("127.0.0.1", port, bad, "mallory", me.cert_pem)
            with pytest.raises(Refused, match="burned"):
                await join("127.0.0.1", port, code, "bob", me.cert_pem)  # 6th attempt, right code

            code = master.new_code()
            master.invitations._by_nameplate[code[:2]].issued -= TTL + 1  # issued over 5 minutes ago
            with pytest.raises(Refused, match="expired"):
                await join("127.0.0.1", port, code, "bob", me.cert_pem)
            with pytest.raises(Unreachable, match="cannot pair with"):
                await join("127.0.0.1", _free_port(), code, "bob", me.cert_pem)
            assert [m.name for m in master.members.members()] == ["alice"]
        finally:
            await master.stop()

    run(main(), 120)


def test_joining_by_lan_discovery_skips_unreachable_addresses_and_other_groups(ckpt, tmp_path, monkeypatch):
    """``pair_with_group`` decides by the failure's type: an unreachable address moves on to the
    master's next address, an unknown code (another group's master) to the next master."""
    import worker_core.discovery
    from app.group.client import NoGroupFound, pair_with_group

    async def main():
        ours, theirs = Master(paired_config(ckpt, tmp_path / "ours")), Master(paired_config(ckpt, tmp_path / "theirs"))
        await ours.start()
        await theirs.start()
        try:
            code = ours.new_code()
            if code[:2] in theirs.invitations._by_nameplate:  # the other group must not know this nameplate
                theirs.invitations._by_nameplate.pop(code[:2])
            found = [
                (["127.0.0.1"], theirs.group_port.port, "theirs"),  # answers: no such code
                (["127.0.0.2", "127.0.0.1"], ours.group_port.port, "ours"),  # not bound on 127.0.0.2
            ]

            async def browse(seconds: float):
                return found

            monkeypatch.setattr(worker_core.discovery, "browse", browse)
            joined = await pair_with_group(code, None, tmp_path / "me", "me")
            assert joined.group == ours.members.group and joined.master_port == ours.group_port.port
            assert [m.name for m in ours.members.members()] == ["me"] and theirs.members.members() == []

            found[:] = [(["127.0.0.1"], theirs.group_port.port, "theirs")]
            with pytest.raises(UnknownCode):
                await pair_with_group(ours.new_code(), None, tmp_path / "me", "me")
            found[:] = []
            with pytest.raises(NoGroupFound):
                await pair_with_group(ours.new_code(), None, tmp_path / "me", "me")
        finally:
            await ours.stop()
            await theirs.stop()

    run(main(), 120)


def test_only_members_complete_the_handshake_removal_is_immediate_and_master_is_pinned(ckpt, tmp_path):
    async def main():
        master = Master(paired_config(ckpt, tmp_path / "m", min_workers=1))
        await master.start()
        port = master.group_port.port
        alice = load_or_create(tmp_path / "a" / "identity", "alice")
        stranger = load_or_create(tmp_path / "s" / "identity", "stranger")
        joined = await join("127.0.0.1", port, master.new_code(), "alice", alice.cert_pem)
        worker = None
        try:
            # a member: the handshake completes and HTTP answers
            assert (await _raw_tls(port, client_context(alice, joined.master_cert))).startswith(b"HTTP/1.1")
            # a machine that never paired: the server refuses its certificate in the handshake
            with pytest.raises((ssl.SSLError, ConnectionError)):
                answer = await _raw_tls(port, client_context(stranger, joined.master_cert))
                assert answer == b""  # TLS 1.3: the client may see the refusal only as a closed stream
                raise ConnectionError("closed")

            # the member's worker serves, with weights delivered by the master
            cfg = WorkerConfig(
                master=f"127.0.0.1:{port}",
                device="cpu",
                tls=client_context(alice, joined.master_cert),
                reconnect=False,
                weights_dir=tmp_path / "a" / "weights",
            )
            worker = asyncio.create_task(serve(cfg))
            await asyncio.wait_for(master.group.wait_serving(), 60)
            assert [s.member for s in master.group.stages] == ["alice"]
            assert master.group.stages[0].weight_bytes_sent > 0
            assert list((tmp_path / "a" / "weights" / "tensors").rglob("*.safetensors"))

            # removal: the live tunnel closes at once and the next handshake fails
            assert master.remove_member("alice")
            await asyncio.wait_for(worker, 10)
            assert not master.group.live_links()
            with pytest.raises((ssl.SSLError, ConnectionError)):
                if await _raw_tls(port, client_context(alice, joined.master_cert)) == b"":
                    raise ConnectionError("closed")
        finally:
            if worker:
                worker.cancel()
            await master.stop()

        # another master (another certificate) on the same address: the pinned worker refuses it
        impostor = Master(paired_config(ckpt, tmp_path / "other", group_port=port))
        await impostor.start()
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await _raw_tls(port, client_context(alice, joined.master_cert))
        finally:
            await impostor.stop()

    run(main(), 180)


def test_mdns_finds_the_group(ckpt, tmp_path):
    """The announcement carries the bound address only, even beside another group announced
    from this machine with another address (CI once saw the two pool their address records)."""
    from master_core.announce import Advertiser
    from worker_core.discovery import browse

    async def main():
        master = Master(paired_config(ckpt, tmp_path / "m", group_name="mdns-test-group"))
        await master.start()
        neighbour = Advertiser(master.group_port.port + 1, "mdns-neighbour-group", "192.0.2.7")
        await neighbour.start()
        try:
            found = await browse(3.0)
            mine = [f for f in found if f[2] == "mdns-test-group"]
            assert mine and mine[0][0] == ["127.0.0.1"] and mine[0][1] == master.group_port.port
            theirs = [f for f in found if f[2] == "mdns-neighbour-group"]
            assert theirs and theirs[0][0] == ["192.0.2.7"]
        finally:
            await neighbour.stop()
            await master.stop()
        assert not [f for f in await browse(2.0) if f[2] == "mdns-test-group"]  # withdrawn on stop

    run(main(), 60)


@pytest.mark.slow
def test_member_joining_mid_generation_waits_for_the_requests_then_gets_its_weights(ckpt, tmp_path):
    from harness import greedy

    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], list(range(20, 80))]
    want = [reference_greedy(ckpt, p, 64) for p in prompts]

    async def main():
        master = Master(paired_config(ckpt, tmp_path / "m", min_workers=1))
        await master.start()
        tasks = []
        try:

            async def member(name: str) -> None:
                cfg = await join_member(master, tmp_path, name, reconnect=False)
                tasks.append(asyncio.create_task(serve(cfg)))

            await member("alice")
            await asyncio.wait_for(master.group.wait_serving(), 60)
            # the master's end of a (TLS) tunnel keeps few bytes unsent too (worker_core.unsent)
            (sock,) = [link.ws.get_extra_info("socket") for link in master.group.links]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == UNSENT_BYTES
            gens = [asyncio.create_task(master.engine.generate(p, greedy(64))) for p in prompts]
            while master.engine.tokens_generated < 10:
                await asyncio.sleep(0.01)
            # a joining member's pairing can outlast those requests on a busy machine: overlapping
            # holders keep the pipeline busy until his tunnel is up, however long that takes
            holders = [master.engine.submit([3, 4], greedy(400))]
            joining = asyncio.create_task(member("bob"))  # joins mid-generation: taken in once the requests end
            while len(master.group.links) < 2:
                assert not joining.done() or joining.exception() is None, joining.exception()
                if len(holders[-1].output) >= 200:
                    holders.append(master.engine.submit([3, 4], greedy(400)))
                await asyncio.sleep(0.005)
            await joining
            assert not all(h.finished for h in holders), "the join came after the requests"
            for h in holders:
                master.engine.cancel(h)
            results = await asyncio.wait_for(asyncio.gather(*gens), 120)
            deadline = asyncio.get_running_loop().time() + 60
            while len(master.group.stages) < 2 or not master.group.serving:  # then he fetches his layers
                assert asyncio.get_running_loop().time() < deadline, master.group.problem
                await asyncio.sleep(0.05)
            assert master.group.epoch == 2  # re-planned once, for him
            # not while the requests ran: none was restarted by the epoch change (the group's epoch
            # read when the requests' tasks resume can already be the new one: the re-plan may
            # come as soon as the engine ends the last request)
            assert master.engine.kv.reset_restarts == 0, "the join re-planned while requests ran (they replayed)"
            return [r[0] for r in results], [s.member for s in master.group.stages]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await master.stop()

    got, stages = run(main(), 240)
    assert got == want
    assert sorted(stages) == ["alice", "bob"] and list(
        (tmp_path / "bob" / "weights" / "tensors").rglob("*.safetensors")
    )


def test_a_restarted_paired_master_is_rejoined_by_its_members_on_their_own(ckpt, tmp_path):
    """The master stops and starts again from its data folder on the same group port: the
    member, never touched, reconnects over mutual TLS (capped backoff with jitter), is known by
    its pinned certificate, gets its layers again, and the group answers as before."""
    from harness import greedy

    port = _free_port()

    async def main() -> tuple[list[int], list[int], list[str | None]]:
        master = Master(paired_config(ckpt, tmp_path / "m", group_port=port, min_workers=1))
        await master.start()
        cfg = await join_member(master, tmp_path, "alice")
        worker = asyncio.create_task(serve(cfg))
        again = None
        try:
            await asyncio.wait_for(master.group.wait_serving(), 60)
            before = (await master.engine.generate([5, 6, 7, 8], greedy(12)))[0]
            await master.stop()
            again = Master(paired_config(ckpt, tmp_path / "m", group_port=port, min_workers=1))
            await again.start()
            await asyncio.wait_for(again.group.wait_serving(), 60)
            after = (await again.engine.generate([5, 6, 7, 8], greedy(12)))[0]
            return before, after, [link.member for link in again.group.links]
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            if again is not None:
                await again.stop()

    before, after, members = run(main(), 180)
    assert after == before == reference_greedy(ckpt, [5, 6, 7, 8], 12)
    assert members == ["alice"]


# ---------------------------------------------------------------- the command line, end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _molink(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is TerminateProcess there: no clean exit to check")
def test_create_join_join_serve_and_answer_a_chat(ckpt, tmp_path):
    group_port, api_port = _free_port(), _free_port()
    master_dir = tmp_path / "master"
    procs = []
    try:
        master = _molink(
            "group",
            "create",
            "--model",
            str(ckpt),
            "--host",
            "127.0.0.1",
            "--port",
            str(group_port),
            "--api-port",
            str(api_port),
            "--data-dir",
            str(master_dir),
            "--min-workers",
            "2",
            "--name",
            "e2e-group",
        )
        procs.append(master)
        code = output_line(master, "Pairing code:", 120, at_start=True).split()[-1]
        # the first machine finds the master by mDNS, the second is told where it is
        first = subprocess.run(
            [sys.executable, "-m", "app.cli", "join", code, "--data-dir", str(tmp_path / "w1"), "--name", "alice"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert first.returncode == 0, first.stderr
        assert "Joined group 'e2e-group' as 'alice'" in first.stdout
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "join",
                code,
                "--master",
                f"127.0.0.1:{group_port}",
                "--data-dir",
                str(tmp_path / "w2"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1 and "already used" in again.stderr and "Traceback" not in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
        code2 = subprocess.run(
            [sys.executable, "-m", "app.cli", "group", "code", "--data-dir", str(master_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert code2.returncode == 0, code2.stderr
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "join",
                code2.stdout.split()[2],
                "--master",
                f"127.0.0.1:{group_port}",
                "--data-dir",
                str(tmp_path / "w2"),
                "--name",
                "bob",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 0, second.stderr

        for d in ("w1", "w2"):  # neither worker can read the model: only the master holds it
            procs.append(_molink("worker", "--data-dir", str(tmp_path / d), "--device", "cpu", "--threads", "1"))
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
                    break  # 200: serving
            except urllib.error.HTTPError as e:  # 503 until both workers hold their layers
                problem = json.loads(e.read()).get("problem")
            assert time.monotonic() < deadline, f"group never served: {problem}"
            time.sleep(0.5)

        probe = subprocess.run(
            [sys.executable, "-m", "app.cli", "probe", "--device", "cpu", "--json", "--data-dir", str(tmp_path / "w1")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        link = json.loads(probe.stdout)
        assert link["rtt_ms"] > 0 and link["bandwidth_mbps"] > 1, (
            probe.stderr
        )  # measured over the mutual-TLS group port

        members = subprocess.run(
            [sys.executable, "-m", "app.cli", "group", "members", "--data-dir", str(master_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "alice" in members.stdout and "bob" in members.stdout and members.stdout.count("connected") == 2
        # what each worker announced: its device and speed, and the link it measured before dialling;
        # the path is the master's reading of where its tunnel comes from (loopback here)
        announced = re.findall(
            r"GFLOP/s, RAM \d+ GB, \d+ cores; link this PC, ([\d.]+) ms, (\d+) Mbit/s; layers \[(\d+), (\d+)\)",
            members.stdout,
        )
        assert len(announced) == 2, members.stdout
        assert all(float(rtt) > 0 and int(mbps) > 1 for rtt, mbps, _, _ in announced)
        assert sorted(int(b) - int(a) for _, _, a, b in announced) == [2, 2]  # 4 layers over 2 equal members

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt)
        messages = [{"role": "user", "content": "hello there"}]
        body = {"model": "x", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        with urllib.request.urlopen(urllib.request.Request(f"{api}/v1/models"), timeout=10) as r:
            body["model"] = json.loads(r.read())["data"][0]["id"]
        req = urllib.request.Request(
            f"{api}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        want = tok.decode(reference_greedy(ckpt, list(prompt), 6), skip_special_tokens=True)
        assert answer == want
        for d in ("w1", "w2"):
            assert list((tmp_path / d / "weights" / "tensors").rglob("*.safetensors")), "weights were delivered"
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
