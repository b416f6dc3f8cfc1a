"""The network lab (app/tools/netlab): real network stacks in namespaces, kernel NAT, a real
UPnP/NAT-PMP/PCP router (miniupnpd).  Needs root and `ip netns` (CI runs as root); without them
every test here is skipped, saying why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import output_line, output_seen

from app.tools.netlab.lab import Lab, labs, unavailable

ROOT = Path(__file__).resolve().parents[1]
REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

ECHO_SERVER = (
    "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
    "s.bind(('0.0.0.0',9000));s.listen();print('ready',flush=True);c,a=s.accept();print(a[0],flush=True);"
    "c.sendall(c.recv(100));c.close()"
)
ECHO_CLIENT = (
    "import socket,sys,time;t=time.monotonic();c=socket.create_connection((sys.argv[1],9000),timeout=3);"
    "c.sendall(b'hi');assert c.recv(10)==b'hi';print(round((time.monotonic()-t)*1000))"
)
MAP = (
    "import asyncio,sys\nfrom worker_core.portmap import PortMapper\n"
    "async def main():\n"
    "    pm=PortMapper(int(sys.argv[1]),protocols=tuple(sys.argv[2].split(',')),lease=120)\n"
    "    m=await pm.start()\n"
    "    print('mapped',m.external_host if m else None,m.external_port if m else None,m.reachable if m else None,"
    "flush=True)\n"
    "    print('failure',pm.failure,flush=True)\n"
    "    sys.stdin.readline()\n"
    "    await pm.stop()\n"
    "asyncio.run(main())\n"
)


def _echo(lab: Lab, server: str, client: str, address: str) -> tuple[str, subprocess.CompletedProcess]:
    srv = lab.spawn(server, [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        done = lab.run(client, [sys.executable, "-c", ECHO_CLIENT, address], check=False, timeout=20)
        seen = srv.stdout.readline().strip() if done.returncode == 0 else ""
        return seen, done
    finally:
        srv.kill()
        srv.wait(5)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout


def test_homes_nat_and_seal_and_down_removes_everything():
    with Lab.up("tnat", "upnp", mbps=50, delay_ms=20) as lab:
        assert "mlk-tnat-a" in _namespaces() and "tnat" in labs()
        seen, done = _echo(lab, "pub", "b", lab.address("pub"))  # out of home b through its NAT
        assert done.returncode == 0, done.stderr
        assert seen == lab.wan_address("b")  # the public host sees the router's address, not 192.168.x
        assert int(done.stdout) >= 40  # 20 ms each way on the router, for any TCP program
        seen, done = _echo(lab, "a2", "a", lab.address("a2"))  # on the LAN: no NAT, no delay
        assert done.returncode == 0 and seen == lab.address("a")
        _seen, done = _echo(lab, "a", "pub", lab.address("a"))  # nobody outside reaches a LAN address
        assert done.returncode != 0
        _seen, done = _echo(lab, "a", "pub", lab.wan_address("a"))  # nor a home through its router unasked
        assert done.returncode != 0
        # sealed: no interface of the lab in this namespace
        own = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout
        assert "wan0" not in own and "br0" not in own
        pids = [int(p) for p in lab.state["pids"]]
        assert pids  # the delay proxies and miniupnpd
        # every host's TCP is CUBIC (Windows' and most Linuxes' default), whatever this machine's own
        cc = lab.run("b", ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"]).stdout.strip()
        assert cc == "cubic" and lab.state["congestion"] == "cubic"
    assert "mlk-tnat-" not in _namespaces() and "tnat" not in labs()
    for pid in pids:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(") ")[1][0] != "Z"


def test_down_from_another_process_after_a_crash():
    made = subprocess.run(
        [sys.executable, "-m", "app.cli", "lab", "up", "tcrash", "--topology", "lan"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "app.cli", "lab", "run", "tcrash", "a", "--", "ip", "-4", "-o", "addr"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert ran.returncode == 0 and "192.168.10.10" in ran.stdout
    finally:
        gone = subprocess.run(
            [sys.executable, "-m", "app.cli", "lab", "down", "tcrash"], capture_output=True, text=True, timeout=60
        )
    assert gone.returncode == 0 and "removed" in gone.stdout
    assert "mlk-tcrash-" not in _namespaces()


@pytest.mark.parametrize("protocols", ["pcp", "nat-pmp", "upnp", "pcp,nat-pmp,upnp"])
def test_real_router_maps_and_unmaps(protocols):
    with Lab.up("tmap", "upnp") as lab:
        proc = lab.spawn("a", [sys.executable, "-c", MAP, "9000", protocols], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline().split()
        assert line[:2] == ["mapped", lab.wan_address("a")], (line, proc.stdout.readline())
        assert line[3] == "True"  # a public external address: reachable
        rules = lab.ruleset("r-a")
        assert f"dnat ip to {lab.address('a')}:9000" in rules
        srv_port = line[2]
        # someone outside dials the mapped address and reaches the LAN host
        echo = lab.spawn("a", [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        client = ECHO_CLIENT.replace("9000", srv_port)
        done = lab.run("pub", [sys.executable, "-c", client, lab.wan_address("a")], check=False, timeout=20)
        echo.kill()
        echo.wait(5)
        assert done.returncode == 0, done.stderr
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(20)
        assert "dnat" not in lab.ruleset("r-a")  # removed on stop


def test_carrier_grade_nat_refuses_mapping():
    with Lab.up("tcg", "cgnat") as lab:
        proc = lab.spawn("c", [sys.executable, "-c", MAP, "9000", "pcp,nat-pmp,upnp"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().split()[1] == "None"
        failure = proc.stdout.readline()
        assert "pcp:" in failure and "nat-pmp:" in failure and "upnp:" in failure
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(20)
        time.sleep(0.1)
        assert "dnat" not in lab.ruleset("r-c")


# ---------------------------------------------------------------- groups across homes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), num_layers=4)


def _molink(lab: Lab, host: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return lab.spawn(host, [sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT))  # fmt: skip


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


ASK = (
    "import json,sys,urllib.request\n"
    "api=sys.argv[1]\n"
    "with urllib.request.urlopen(api+'/v1/models',timeout=10) as r: model=json.loads(r.read())['data'][0]['id']\n"
    "body={'model':model,'messages':[{'role':'user','content':'hello there'}],'max_tokens':6,'temperature':0,"
    "'ignore_eos':True}\n"
    "req=urllib.request.Request(api+'/v1/chat/completions',data=json.dumps(body).encode(),"
    "headers={'Content-Type':'application/json'})\n"
    "with urllib.request.urlopen(req,timeout=120) as r: print(json.dumps(json.loads(r.read())['choices'][0]))\n"
)
WORKERS = (  # the master's members as /health describes them (stage, next hop)
    "import json,sys,urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1]+'/health',timeout=10) as r:\n"
    "    print(json.dumps(json.loads(r.read())['workers']))\n"
)


def _answers_as_transformers(lab: Lab, host: str, ckpt) -> None:
    """A greedy chat answer from the master on ``host`` equals single-process transformers'."""
    from tiny_models import reference_greedy
    from transformers import AutoTokenizer

    asked = lab.run(host, [sys.executable, "-c", ASK, "http://127.0.0.1:8000"], timeout=150)
    answer = json.loads(asked.stdout)["message"]["content"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    chat = [{"role": "user", "content": "hello there"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert answer == tok.decode(reference_greedy(ckpt, list(prompt), 6), skip_special_tokens=True)


HEALTH = (
    "import sys,time,urllib.request,urllib.error\n"
    "deadline=time.monotonic()+float(sys.argv[2])\n"
    "while time.monotonic()<deadline:\n"
    "    try:\n"
    "        urllib.request.urlopen(sys.argv[1]+'/health',timeout=5); print('serving'); break\n"
    "    except (urllib.error.URLError, OSError): time.sleep(0.5)\n"
    "else: sys.exit(1)\n"
)


@pytest.mark.slow
def test_friend_in_another_home_joins_with_the_link_alone(ckpt, tmp_path):
    """Master in home a (router with miniupnpd), friend in home b: the join link is all the friend
    has; the group port is mapped on a's router while the group runs and unmapped after; the
    friend's tunnel through the mapping marks it checked from outside; the answer's tokens
    equal single-process transformers'."""
    with Lab.up("tjoin", "upnp", mbps=50, delay_ms=20) as lab:
        procs: list[subprocess.Popen] = []
        try:
            master = _molink(lab, "a", "group", "create", "--model", str(ckpt), "--port", "7733", "--api-port",
                             "8000", "--data-dir", str(tmp_path / "master"), "--name", "lab")  # fmt: skip
            procs.append(master)
            output_line(master, "Pairing code:", 120, at_start=True)
            link = output_line(master, "Join link:", 30, at_start=True).split()[-1]
            reach = output_line(master, "  (", 30, at_start=True)
            wan = lab.wan_address("a")
            assert f"master={wan}%3A7733" in link or f"master={wan}:7733" in link, link
            assert "friends anywhere" in reach, reach
            assert f"dnat ip to {lab.address('a')}:7733" in lab.ruleset("r-a")  # mapped on the router

            joined = lab.run("b", [sys.executable, "-m", "app.cli", "join", link, "--data-dir", str(tmp_path / "w"),
                                   "--name", "friend"], timeout=120, check=False)  # fmt: skip
            assert joined.returncode == 0, joined.stderr + output_seen(master)
            membership = json.loads((tmp_path / "w" / "membership.json").read_text())
            assert membership["master_host"] == wan  # reached through the mapped port, not the LAN address
            kinds = {c["kind"] for c in membership["candidates"]}
            assert kinds == {"lan", "mapped"}, membership["candidates"]

            worker = _molink(lab, "b", "worker", "--data-dir", str(tmp_path / "w"), "--device", "cpu",
                             "--threads", "1")  # fmt: skip
            procs.append(worker)
            up = lab.run("a", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "180"], timeout=200, check=False)
            assert up.returncode == 0, "the group never served"
            _answers_as_transformers(lab, "a", ckpt)
            assert f"dnat ip to {lab.address('a')}:7733" in lab.ruleset("r-a")  # still mapped while serving
            members = lab.run("a", [sys.executable, "-m", "app.cli", "group", "members", "--data-dir",
                                    str(tmp_path / "master")], timeout=30)  # fmt: skip
            assert "; link direct, " in members.stdout, members.stdout  # from b's router's address, not a LAN one
            # the friend's tunnel came from the internet to the mapped port: checked from outside
            said = output_line(master, "checked from outside by member friend", 30)
            assert f"({wan}:7733; checked from outside by member friend)" in said, said
        finally:
            _stop(procs)
        assert "dnat" not in lab.ruleset("r-a")  # the master removed its mapping when it stopped


def _join_and_work(lab: Lab, master: subprocess.Popen, tmp_path, name: str, host: str, *args: str) -> subprocess.Popen:
    """Join the group of the master on ``pub`` (data in ``tmp_path / "m"``) from ``host`` with
    a fresh link, as member ``name``, and start its worker (``args`` added)."""
    code = lab.run("pub", [sys.executable, "-m", "app.cli", "group", "code", "--data-dir", str(tmp_path / "m")],
                   timeout=60)  # fmt: skip
    link = next(x for x in code.stdout.splitlines() if x.startswith("Join link:")).split()[-1]
    joined = lab.run(host, [sys.executable, "-m", "app.cli", "join", link, "--data-dir", str(tmp_path / name),
                            "--name", name], timeout=120, check=False)  # fmt: skip
    assert joined.returncode == 0, joined.stderr + output_seen(master)
    return _molink(lab, host, "worker", "--data-dir", str(tmp_path / name), "--device", "cpu", "--threads", "1", *args)


@pytest.mark.slow
def test_stages_in_different_homes_hop_directly_where_the_router_maps_and_relayed_where_not(ckpt, tmp_path):
    """Master on a public host, one worker in each of three homes: a and d behind routers with
    miniupnpd, b behind one without.  Each worker maps its hop port on its router and tells the
    master (Routed.mapped): every hop into a stage in a or d goes direct (the dialler in another
    home dials the mapping), every hop into b is relayed through the master (nothing maps it);
    the answer's tokens equal single-process transformers'; the hop mappings are gone after."""
    homes = {"wa": "a", "wd": "d", "wb": "b"}
    with Lab.up("thops", "hops") as lab:
        procs: list[subprocess.Popen] = []
        try:
            master = _molink(lab, "pub", "group", "create", "--model", str(ckpt), "--port", "7733", "--api-port",
                             "8000", "--data-dir", str(tmp_path / "m"), "--name", "hops", "--min-workers", "3",
                             "--no-port-mapping")  # fmt: skip
            procs.append(master)
            output_line(master, "Pairing code:", 120, at_start=True)
            for name, home in homes.items():
                procs.append(_join_and_work(lab, master, tmp_path, name, home))
            up = lab.run("pub", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "180"], timeout=200,
                         check=False)  # fmt: skip
            assert up.returncode == 0, "the group never served:\n" + output_seen(master)
            state = json.loads(lab.run("pub", [sys.executable, "-c", WORKERS, "http://127.0.0.1:8000"]).stdout)
            stages = sorted((w for w in state if w["stage"] is not None), key=lambda w: w["stage"])
            assert len(stages) == 3, state
            for i, w in enumerate(stages):
                into = stages[(i + 1) % 3]  # the last stage's hop is the loop-back into the first
                mapped = homes[into["name"]] in ("a", "d")
                assert w["next_hop"] and ("direct (" in w["next_hop"]) == mapped, (w["name"], into["name"], state)
            for router in ("r-a", "r-d"):
                assert ":7734" in lab.ruleset(router), lab.ruleset(router)  # the workers' hop ports, mapped
            _answers_as_transformers(lab, "pub", ckpt)
        finally:
            _stop(procs)
        for router in ("r-a", "r-d"):
            assert ":7734" not in lab.ruleset(router)  # each worker removed its mapping when it stopped


@pytest.mark.slow
def test_two_hosts_on_one_lan_find_each_other_by_mdns(ckpt, tmp_path):
    with Lab.up("tmdns", "lan") as lab:
        procs: list[subprocess.Popen] = []
        try:
            master = _molink(lab, "a", "group", "create", "--model", str(ckpt), "--port", "7733", "--api-port",
                             "8000", "--data-dir", str(tmp_path / "master"), "--name", "lan")  # fmt: skip
            procs.append(master)
            code = output_line(master, "Pairing code:", 120, at_start=True).split()[-1]
            joined = lab.run("a2", [sys.executable, "-m", "app.cli", "join", code, "--data-dir", str(tmp_path / "w")],
                             timeout=120, check=False)  # fmt: skip
            assert joined.returncode == 0, joined.stderr
            assert "Joined group 'lan'" in joined.stdout
            membership = json.loads((tmp_path / "w" / "membership.json").read_text())
            assert membership["master_host"] == lab.address("a")  # found by mDNS on the LAN
        finally:
            _stop(procs)


def test_real_router_conflict_718_moves_to_another_port():
    """Another host of the home holds external port 9000 (UPnP); ours gets error 718 from
    miniupnpd and maps another external port, which reaches us from outside."""
    with Lab.up("t718", "upnp") as lab:
        holder = lab.spawn("a2", [sys.executable, "-c", MAP, "9000", "upnp"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
        ours = None
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().split()[1:3] == [lab.wan_address("a"), "9000"]
            ours = lab.spawn("a", [sys.executable, "-c", MAP, "9000", "upnp"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert ours.stdout is not None and ours.stdin is not None
            line = ours.stdout.readline().split()
            assert line[1] == lab.wan_address("a") and line[2] not in ("9000", "None"), line
            rules = lab.ruleset("r-a")
            assert f"dnat ip to {lab.address('a2')}:9000" in rules and f"dnat ip to {lab.address('a')}:9000" in rules
            echo = lab.spawn("a", [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            client = ECHO_CLIENT.replace("9000", line[2])
            done = lab.run("pub", [sys.executable, "-c", client, lab.wan_address("a")], check=False, timeout=20)
            echo.kill()
            echo.wait(5)
            assert done.returncode == 0, done.stderr
        finally:
            for p in (holder, ours):
                if p is not None and p.stdin is not None:
                    p.stdin.write("\n")
                    p.stdin.flush()
                    p.wait(20)
        assert "dnat" not in lab.ruleset("r-a")


DIAL_UNKNOWN = (  # dial a relay for a group nobody registered: it answers with an error frame
    "import socket,sys\nfrom worker_core.bridge_wire import Dial,encode\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
    "s.sendall(encode(Dial(group='ab'*32)))\nprint(s.recv(400)[7:].decode(errors='replace'))\n"
)


def test_a_relay_on_a_home_pc_maps_its_port_and_is_reached_from_outside():
    """`molink relay --map-port` on host a (router with miniupnpd): the router maps the relay's
    port, someone on the internet reaches the relay through it (and is refused by it: no such
    group), and the mapping is gone when the relay stops."""
    with Lab.up("trmap", "upnp") as lab:
        relay = _molink(lab, "a", "relay", "--listen", "0.0.0.0:7735", "--map-port")
        try:
            said = output_line(relay, "relay reachable from outside at", 60, at_start=True)
            outside = f"{lab.wan_address('a')}:7735"
            assert said.strip().endswith(f"at {outside} (mapped on your router)"), said
            answer = lab.run("pub", [sys.executable, "-c", DIAL_UNKNOWN, lab.wan_address("a"), "7735"], timeout=30)
            assert "unknown_group" in answer.stdout, answer.stdout + answer.stderr
            assert f"dnat ip to {lab.address('a')}:7735" in lab.ruleset("r-a")
        finally:
            _stop([relay])
        assert ":7735" not in lab.ruleset("r-a")


TLS_HELLO = (  # a TLS handshake with the group port's pairing name; prints the certificate's fingerprint
    "import hashlib,socket,ssl,sys\nctx=ssl.create_default_context();ctx.check_hostname=False;"
    "ctx.verify_mode=ssl.CERT_NONE\n"
    "with socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5) as s:\n"
    "    with ctx.wrap_socket(s,server_hostname='molink-pair') as t:\n"
    "        print(hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest())\n"
)


def test_a_group_port_on_both_families_answers_ipv4_and_ipv6(ckpt, tmp_path):
    """`group create --host ::` listens on IPv4 and IPv6 at once (asyncio alone would make it
    IPv6-only): a host behind an IPv4 NAT and the IPv6 home both complete a TLS handshake with
    the same master, and the join link lists its global IPv6 address."""
    with Lab.up("tdual", "ipv6") as lab:
        master = _molink(lab, "pub", "group", "create", "--model", str(ckpt), "--host", "::", "--port", "7733",
                         "--api-port", "8000", "--data-dir", str(tmp_path / "m"), "--name", "dual",
                         "--no-port-mapping")  # fmt: skip
        try:
            link = output_line(master, "Join link:", 120, at_start=True)
            v6 = lab.address6("pub")
            assert v6 and f"ipv6~[{v6}]:7733" in link, link
            over4 = lab.run("b", [sys.executable, "-c", TLS_HELLO, lab.address("pub"), "7733"], timeout=30)
            over6 = lab.run("v", [sys.executable, "-c", TLS_HELLO, v6, "7733"], timeout=30)
            assert over4.stdout.strip() == over6.stdout.strip() and len(over4.stdout.strip()) == 64
        finally:
            _stop([master])


@pytest.mark.slow
def test_a_stage_on_ipv6_takes_its_hop_over_ipv6(ckpt, tmp_path):
    """A worker's hop listener is on both families (``::``): a worker on a dual-stack public
    host announces its global IPv6 address for hops (``--hop-host``), and the stage before it,
    in the IPv6 home, dials it there directly.  The hop into the IPv6 home is relayed (its
    router's stateful firewall drops what comes in, and this router opens no pinholes: see
    the ``pinhole`` topology's tests below).  Tokens equal single-process transformers'."""
    with Lab.up("thop6", "ipv6") as lab:
        procs: list[subprocess.Popen] = []
        try:
            stages = _six_hop_group(lab, ckpt, tmp_path, procs, "wv", "v", "--no-port-mapping")
            into_w6 = next(w for w in stages if w["name"] == "wv")  # its next hop (or loop-back) is into w6
            into_wv = next(w for w in stages if w["name"] == "w6")
            assert into_w6["next_hop"] and "direct (" in into_w6["next_hop"], stages
            assert into_wv["next_hop"] and "direct (" not in into_wv["next_hop"], stages
            _answers_as_transformers(lab, "pub", ckpt)
        finally:
            _stop(procs)


def _six_hop_group(lab: Lab, ckpt, tmp_path, procs: list[subprocess.Popen], name: str, host: str, *args: str) -> list:
    """A group served by two stages: w6 on the dual-stack public host pub2, announcing its IPv6
    address for hops, and ``name`` on ``host`` (``args`` added); the master on pub.  Returns
    the two stages as /health describes them, once the group serves (its processes in ``procs``)."""
    master = _molink(lab, "pub", "group", "create", "--model", str(ckpt), "--host", "::", "--port", "7733",
                     "--api-port", "8000", "--data-dir", str(tmp_path / "m"), "--name", "six",
                     "--min-workers", "2", "--no-port-mapping")  # fmt: skip
    procs.append(master)
    output_line(master, "Pairing code:", 120, at_start=True)
    v6 = lab.address6("pub2")
    assert v6
    procs.append(_join_and_work(lab, master, tmp_path, "w6", "pub2", "--no-port-mapping", "--hop-host", v6))
    procs.append(_join_and_work(lab, master, tmp_path, name, host, *args))
    up = lab.run("pub", [sys.executable, "-c", HEALTH, "http://127.0.0.1:8000", "180"], timeout=200, check=False)
    assert up.returncode == 0, "the group never served:\n" + output_seen(master)
    state = json.loads(lab.run("pub", [sys.executable, "-c", WORKERS, "http://127.0.0.1:8000"]).stdout)
    stages = sorted((w for w in state if w["stage"] is not None), key=lambda w: w["stage"])
    assert [w["name"] for w in stages] in (["w6", name], [name, "w6"]), state
    return stages


def _pinhole_rule(lab: Lab, router: str, host: str, port: int) -> bool:
    """miniupnpd's pinhole for ``[host]:port`` is in ``router``'s ruleset (its forward chain
    `miniupnpd`; nft prints the IPv6 destination as raw bytes)."""
    import ipaddress

    raw = "0x" + ipaddress.IPv6Address(host).packed.hex()
    return any(f"th dport {port} " in line and raw in line for line in lab.ruleset(router).splitlines())


PINHOLE = (
    "import asyncio,sys\nfrom worker_core.portmap.pinhole import Pinholer\n"
    "async def main():\n"
    "    p=Pinholer(int(sys.argv[1]),protocols=tuple(sys.argv[2].split(',')),lease=120)\n"
    "    h=await p.start()\n"
    "    print('opened',h.protocol if h else None,h.host if h else None,flush=True)\n"
    "    print('failure',p.failure,flush=True)\n"
    "    sys.stdin.readline()\n"
    "    await p.stop()\n"
    "asyncio.run(main())\n"
)
ECHO6_SERVER = ECHO_SERVER.replace("socket.socket()", "socket.socket(socket.AF_INET6)").replace("'0.0.0.0'", "'::'")


@pytest.mark.parametrize("protocols", ["upnp", "pcp", "upnp,pcp"])
def test_real_router_opens_and_closes_an_ipv6_pinhole(protocols):
    """miniupnpd with IPv6 firewall control: each protocol opens a pinhole (both at once: UPnP
    does); the rule is in the router's ruleset, pub reaches the port over IPv6 (not before), and
    the rule is gone after stop."""
    with Lab.up("tpin6", "pinhole") as lab:
        v6 = lab.address6("v")
        assert v6
        echo = lab.spawn("v", [sys.executable, "-c", ECHO6_SERVER], stdout=subprocess.PIPE, text=True)
        proc = None
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            before = lab.run("pub", [sys.executable, "-c", ECHO_CLIENT, v6], check=False, timeout=20)
            assert before.returncode != 0  # the router's firewall drops it
            proc = lab.spawn("v", [sys.executable, "-c", PINHOLE, "9000", protocols], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().split()
            assert line == ["opened", protocols.split(",")[0], v6], (line, proc.stdout.readline())
            assert _pinhole_rule(lab, "r-v", v6, 9000), lab.ruleset("r-v")
            done = lab.run("pub", [sys.executable, "-c", ECHO_CLIENT, v6], check=False, timeout=20)
            assert done.returncode == 0, done.stderr
            assert echo.stdout.readline().strip() == lab.address6("pub")  # straight from pub: no NAT on IPv6
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(20)
        finally:
            echo.kill()
            echo.wait(5)
            if proc is not None and proc.poll() is None:
                proc.kill()
        assert not _pinhole_rule(lab, "r-v", v6, 9000), lab.ruleset("r-v")  # removed on stop


def test_an_ipv6_home_router_opens_a_pinhole_for_the_group_port(ckpt, tmp_path):
    """Master in home v (IPv6 behind a stateful firewall; its router's miniupnpd opens pinholes).
    Without port mapping, a TLS handshake from pub to the master's IPv6 address is dropped by
    the router.  With it, the master asks for a pinhole: the rule is in the router's ruleset
    while the group runs, the link and the summary name it, and pub completes a TLS handshake
    with the master's certificate over IPv6, directly; after the master stops the rule is gone
    and pub is blocked again."""
    with Lab.up("tpin", "pinhole") as lab:
        v6 = lab.address6("v")
        assert v6
        create = ["group", "create", "--model", str(ckpt), "--host", "::", "--port", "7733", "--api-port", "8000",
                  "--name", "pin"]  # fmt: skip
        closed = _molink(lab, "v", *create, "--data-dir", str(tmp_path / "m0"), "--no-port-mapping")
        try:
            output_line(closed, "Join link:", 120, at_start=True)
            blocked = lab.run("pub", [sys.executable, "-c", TLS_HELLO, v6, "7733"], timeout=30, check=False)
            assert blocked.returncode != 0 and "timed out" in blocked.stderr, blocked.stdout + blocked.stderr
        finally:
            _stop([closed])
        master = _molink(lab, "v", *create, "--data-dir", str(tmp_path / "m"))
        try:
            link = output_line(master, "Join link:", 120, at_start=True)
            reach = output_line(master, "  (", 30, at_start=True)
            assert f"ipv6~[{v6}]:7733" in link and f"mapped~{lab.wan_address('v')}:7733" in link, link
            assert f"IPv6: pinhole opened on your router for [{v6}]:7733" in reach, reach
            assert _pinhole_rule(lab, "r-v", v6, 7733), lab.ruleset("r-v")
            mine = lab.run("v", [sys.executable, "-c", TLS_HELLO, "::1", "7733"], timeout=30).stdout.strip()
            over6 = lab.run("pub", [sys.executable, "-c", TLS_HELLO, v6, "7733"], timeout=30, check=False)
            assert over6.returncode == 0 and over6.stdout.strip() == mine, over6.stderr
        finally:
            _stop([master])
        assert not _pinhole_rule(lab, "r-v", v6, 7733), lab.ruleset("r-v")  # removed when the master stopped
        again = lab.run("pub", [sys.executable, "-c", TLS_HELLO, v6, "7733"], timeout=30, check=False)
        assert again.returncode != 0


@pytest.mark.slow
def test_a_friend_with_ipv6_joins_through_the_pinhole_which_is_then_verified(ckpt, tmp_path):
    """Master in home v (pinhole opened); a friend on the dual-stack public host pub joins with
    the link alone and starts its worker: its tunnel takes the pinholed IPv6 address (tried
    before the unverified IPv4 mapping of the same rank), and coming from outside the master's
    /64 it marks the pinhole checked from outside."""
    with Lab.up("tpinj", "pinhole") as lab:
        v6 = lab.address6("v")
        assert v6
        procs: list[subprocess.Popen] = []
        try:
            master = _molink(lab, "v", "group", "create", "--model", str(ckpt), "--host", "::", "--port", "7733",
                             "--api-port", "8000", "--data-dir", str(tmp_path / "m"), "--name", "pin")  # fmt: skip
            procs.append(master)
            link = output_line(master, "Join link:", 120, at_start=True).split()[-1]
            joined = lab.run("pub", [sys.executable, "-m", "app.cli", "join", link, "--data-dir", str(tmp_path / "w"),
                                     "--name", "friend"], timeout=120, check=False)  # fmt: skip
            assert joined.returncode == 0, joined.stderr + output_seen(master)
            procs.append(_molink(lab, "pub", "worker", "--data-dir", str(tmp_path / "w"), "--device", "cpu",
                                 "--threads", "1", "--no-port-mapping"))  # fmt: skip
            said = output_line(master, "checked from outside by member friend", 120)
            assert f"IPv6: pinhole opened on your router for [{v6}]:7733; checked from outside by member friend" in said
            members = lab.run("v", [sys.executable, "-m", "app.cli", "group", "members", "--data-dir",
                                    str(tmp_path / "m")], timeout=30)  # fmt: skip
            assert "; link IPv6, " in members.stdout, members.stdout
        finally:
            _stop(procs)
        assert not _pinhole_rule(lab, "r-v", v6, 7733)


@pytest.mark.slow
def test_a_stage_behind_an_ipv6_firewall_takes_its_hop_through_a_pinhole(ckpt, tmp_path):
    """Home w's router opens IPv6 pinholes and maps no IPv4 port.  Its worker asks for a pinhole
    to its hop port and answers its route with it (``Routed.mapped`` = ``[v6]:7734``); the stage
    before it, on the dual-stack public host pub2, dials it there: the hop into w is direct (in
    the ``ipv6`` topology, without a pinhole, the same hop is relayed: the test above); the
    pinhole rule is in w's router's ruleset while the group serves and gone after; tokens equal
    single-process transformers'."""
    with Lab.up("thpin", "pinhole") as lab:
        procs: list[subprocess.Popen] = []
        w6 = lab.address6("w")
        assert w6
        try:
            stages = _six_hop_group(lab, ckpt, tmp_path, procs, "ww", "w")  # maps its hop port: a pinhole only
            into_ww = next(w for w in stages if w["name"] == "w6")  # its next hop (or loop-back) is into ww
            assert into_ww["next_hop"] and "direct (" in into_ww["next_hop"], stages
            assert _pinhole_rule(lab, "r-w", w6, 7734), lab.ruleset("r-w")
            assert "dnat" not in lab.ruleset("r-w")  # no IPv4 mapping: the hop came through the pinhole
            _answers_as_transformers(lab, "pub", ckpt)
        finally:
            _stop(procs)
        said = procs[-1].stdout.read()[-3000:] if procs and procs[-1].stdout else ""  # ww's, ended
        assert not _pinhole_rule(lab, "r-w", w6, 7734), lab.ruleset("r-w") + said
