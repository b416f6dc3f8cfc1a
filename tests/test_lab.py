"""The network lab (app/tools/netlab): real network stacks in namespaces, kernel NAT, a real
UPnP/NAT-PMP/PCP router (miniupnpd).  Needs root and `ip netns` (CI runs as root); without them
every test here is skipped, saying why."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.tools.netlab.lab import Lab, labs, unavailable

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
