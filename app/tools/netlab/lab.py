"""The network lab's lifecycle: build a topology in network namespaces, run programs in it, tear it down.

Contract
--------
``Lab.up(name, topology, mbps=None, delay_ms=0, congestion="cubic")`` builds :func:`~app.tools.netlab.topology.plan`
as one network namespace per node, named ``mlk-<name>-<node>`` (the ``mlk-`` prefix is the
lab's alone), joined by veth pairs created straight inside the namespaces: no interface of the
lab ever exists in the machine's own namespace, so the lab is sealed (no route out, its
addresses exist only inside it).  Routers NAT with nftables (``masquerade``, or ``masquerade
fully-random`` for a symmetric NAT), drop unsolicited inbound traffic (IPv4 and IPv6: a
stateful firewall), and run miniupnpd when their home offers UPnP/NAT-PMP/PCP (its ``inet
filter`` table and the chains ``miniupnpd``, ``prerouting_miniupnpd``, ``postrouting_miniupnpd``
are made here, since Debian's ``nft_init.sh`` sources a helper it does not ship; in an IPv6 home
the same miniupnpd opens IPv6 pinholes, as rules in that ``miniupnpd`` forward chain, e.g.
``iif "wan0" th dport 7733 @nh,192,128 0x2a0f... accept``: the destination address as raw bytes).  ``mbps``
shapes every internet link both ways with ``tbf``; ``delay_ms`` runs
:mod:`app.tools.netlab.delay` on each router, which the router's nftables ``redirect`` hands
every TCP connection leaving the home: ``delay_ms`` one way, each direction, for any program.
``congestion`` is every namespace's TCP congestion control (``net.ipv4.tcp_congestion_control``;
CUBIC by default, as on Windows and most Linux systems, whatever this machine's own default;
None: the kernel's default for a new namespace).  A namespace other than the machine's own may
only choose one of the machine's ``tcp_allowed_congestion_control``: one not listed there is
added while labs are up, and the list put back by the :func:`down` that leaves no lab namespace
(the one change outside the labs' namespaces; it lets unprivileged programs choose that algorithm
too meanwhile).  Labs up at once (the test suite's workers) share that change: one machine-wide
lock covers widening the list and setting the namespaces' algorithm, and putting it back, so no
lab's ``down`` narrows the list while another sets it (that failed once: "I/O error").

A state file per lab (``STATE_DIR/<name>.json``) lists its namespaces and processes as they are
made, so :func:`down` (another process, ``molink lab down``) removes everything: every process
inside the lab's namespaces (``ip netns pids``), then the namespaces.  ``up`` removes what it
made when it fails; a :class:`Lab` used as a context manager (tests) goes down on exit, and at
interpreter exit if still up.  ``Lab.attach(name)`` opens a lab made by another process.

``lab.spawn(host, argv)`` starts a program in a host's namespace (``ip netns exec``); ``lab.run``
runs one to its end.  :func:`unavailable` says why this machine cannot run the lab (not root,
no ``ip netns``, no nft), or None.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .topology import NAME, TOPOLOGIES, Node, Topology, lan_prefix, plan

PREFIX = "mlk"
STATE_DIR = Path("/run/molink-netlab")
DELAY_PORT = 3129  # the delay proxy's port on each router
UPNP_HTTP_PORT = 5000  # miniupnpd's HTTP port on each router's LAN address
COMMAND_TIMEOUT = 20.0  # seconds for one ip/nft/tc command
AVAILABLE_CC = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")  # the machine's: namespaces choose among them
CC_LOCK = STATE_DIR / "congestion.lock"  # held while a lab widens that list and sets its namespaces, or narrows it
CC_BEFORE = STATE_DIR / "congestion-allowed-before"  # the list before the first lab widened it
CC_LOCK_SECONDS = 60.0  # the most a lab waits for another's lock (held for a lab's namespaces: seconds)


class LabError(Exception):
    """One line for the user: the lab could not be built, found or used."""


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    if sys.platform != "linux":
        return "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, nftables, tc)"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (apt-get install iproute2 nftables)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()[:200]}"
    return None


def _sh(*argv: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` took longer than {COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[:400]}")
    return done.stdout


def _state_file(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def _check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise LabError(f"lab name {name!r}: lower-case letters and digits, 1-10, starting with a letter")
    return name


class Hosts:
    """Programs run on named hosts, each a namespace; a subclass says how in :meth:`argv`."""

    def argv(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` as run in ``node``'s namespace."""
        raise NotImplementedError

    def spawn(self, node: str, argv: list[str], **popen: Any) -> subprocess.Popen:
        """Start ``argv`` in ``node``'s namespace (the caller stops it; ``down`` kills what is left)."""
        return subprocess.Popen(self.argv(node, argv), **popen)

    def run(self, node: str, argv: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """``argv`` in ``node``'s namespace, its output captured as text; ``check``: a failure raises."""
        done = subprocess.run(self.argv(node, argv), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise LabError(f"{node}: `{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()[:400]}")
        return done


class Lab(Hosts):
    def __init__(self, name: str, state: dict) -> None:
        self.name = name
        self.state = state  # {"topology", "namespaces": {node: ns}, "addresses": {node: ip}, "pids": [...]}
        self._owner = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def up(
        cls,
        name: str,
        topology: str | Topology,
        mbps: float | None = None,
        delay_ms: float = 0.0,
        owner: bool = True,
        congestion: str | None = "cubic",
    ) -> Lab:
        """Build the lab; ``owner``: take it down at interpreter exit (False for ``molink lab up``)."""
        _check_name(name)
        reason = unavailable()
        if reason:
            raise LabError(reason)
        if isinstance(topology, str):
            if topology not in TOPOLOGIES:
                raise LabError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
            topo, topo_name = TOPOLOGIES[topology], topology
        else:
            topo, topo_name = topology, "custom"
        if mbps is not None and mbps <= 0 or delay_ms < 0:
            raise LabError("--mbps must be positive and --delay-ms at least 0")
        if congestion is not None:
            _check_congestion(congestion)
        if _state_file(name).exists():
            down(name)  # a lab of that name left over (a crashed run): replace it
        nodes = plan(topo)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        workdir = STATE_DIR / name
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        state = {
            "topology": topo_name,
            "mbps": mbps,
            "delay_ms": delay_ms,
            "congestion": congestion,
            "namespaces": {n: f"{PREFIX}-{name}-{n}" for n in nodes},
            "addresses": {n: node.address for n, node in nodes.items()},
            "addresses6": {n: node.address6 for n, node in nodes.items() if node.address6},
            "kinds": {n: node.kind for n, node in nodes.items()},
            "upnp": [n for n, node in nodes.items() if node.kind == "router" and node.home and node.home.upnp],
            "pids": [],
            "created": [],
        }
        lab = cls(name, state)
        lab._owner = owner
        if owner:
            atexit.register(lab.down)
        try:
            lab._build(nodes, mbps, delay_ms, congestion)
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def attach(cls, name: str) -> Lab:
        try:
            state = json.loads(_state_file(_check_name(name)).read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} is up (molink lab up {name} --topology T)") from None
        except ValueError:
            raise LabError(f"the state of lab {name!r} is damaged; run `molink lab down {name}`") from None
        return cls(name, state)

    def down(self) -> None:
        down(self.name, self.state)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _save(self) -> None:
        tmp = _state_file(self.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(_state_file(self.name))

    # ------------------------------------------------------------------ use

    @property
    def hosts(self) -> list[str]:
        return list(self.state["namespaces"])

    def namespace(self, node: str) -> str:
        try:
            return self.state["namespaces"][node]
        except KeyError:
            raise LabError(f"lab {self.name!r} has no host {node!r}; it has: {', '.join(self.hosts)}") from None

    def address(self, node: str) -> str:
        addr = self.state["addresses"].get(node)
        if addr is None:
            raise LabError(f"{node!r} has no IPv4 address")
        return addr

    def address6(self, node: str) -> str | None:
        return self.state.get("addresses6", {}).get(node)

    def wan_address(self, home: str) -> str:
        """The internet address of ``home`` (its carrier's, behind a carrier-grade NAT)."""
        for node in (f"cg-{home}", f"r-{home}"):
            if node in self.state["namespaces"]:
                return self._wan(node)
        raise LabError(f"no home {home!r}")

    def _wan(self, node: str) -> str:
        out = _sh("ip", "netns", "exec", self.namespace(node), "ip", "-4", "-o", "addr", "show", "dev", "wan0")
        return out.split()[3].split("/")[0]

    def argv(self, node: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    def ruleset(self, node: str) -> str:
        return _sh("ip", "netns", "exec", self.namespace(node), "nft", "list", "ruleset")

    # ------------------------------------------------------------------ building

    def _ns(self, node: str, *argv: str, stdin: str | None = None) -> str:
        return _sh("ip", "netns", "exec", self.namespace(node), *argv, stdin=stdin)

    def _sysctl(self, node: str, key: str, value: str) -> None:
        _sysctl(self.namespace(node), key, value)

    def _build(self, nodes: dict[str, Node], mbps: float | None, delay_ms: float, congestion: str | None) -> None:
        for n in nodes:
            ns = self.namespace(n)
            _sh("ip", "netns", "add", ns)
            self.state["created"].append(ns)
            self._save()
            self._ns(n, "ip", "link", "set", "lo", "up")
            for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
                self._sysctl(n, key, "0")
        if congestion is not None:
            set_congestion([self.namespace(n) for n in nodes], congestion)
        done: set[tuple[str, str]] = set()
        for n, node in nodes.items():  # veth pairs, each made once, straight inside both namespaces
            for iface in node.ifaces:
                if (iface.peer_node, iface.peer_name) in done:
                    continue
                done.add((n, iface.name))
                _sh(
                    "ip", "link", "add", iface.name, "netns", self.namespace(n), "type", "veth",
                    "peer", "name", iface.peer_name, "netns", self.namespace(iface.peer_node),
                )  # fmt: skip
        for n, node in nodes.items():
            for br, addrs in node.bridges.items():
                self._ns(n, "ip", "link", "add", br, "type", "bridge", "mcast_snooping", "0")
                for a in addrs:
                    self._ns(n, "ip", "addr", "add", a, "dev", br)
                self._ns(n, "ip", "link", "set", br, "up")
            for iface in node.ifaces:
                if iface.bridge:
                    self._ns(n, "ip", "link", "set", iface.name, "master", iface.bridge)
                for a in iface.addrs:
                    self._ns(n, "ip", "addr", "add", a, "dev", iface.name)
                self._ns(n, "ip", "link", "set", iface.name, "up")
                if iface.shaped and mbps:
                    self._ns(
                        n, "tc", "qdisc", "add", "dev", iface.name, "root", "tbf",
                        "rate", f"{mbps}mbit", "burst", "64kb", "latency", "200ms",
                    )  # fmt: skip
            if node.forward:
                self._sysctl(n, "net.ipv4.ip_forward", "1")
                self._sysctl(n, "net.ipv6.conf.all.forwarding", "1")
            for r in node.routes:
                self._ns(n, "ip", "route", "add", *r.split())
            for r in node.routes6:
                self._ns(n, "ip", "-6", "route", "add", *r.split())
        for n, node in nodes.items():
            if node.kind == "router" and node.home and node.home.internet:
                self._ns(n, "nft", "-f", "-", stdin=_router_rules(node, delay_ms > 0))
                if delay_ms > 0:
                    self._daemon(n, [sys.executable, "-m", "app.tools.netlab.delay", "--port", str(DELAY_PORT),
                                     "--delay-ms", str(delay_ms)], "delay")  # fmt: skip
                    self._listening(n, DELAY_PORT, "delay")
                if node.home.upnp:
                    self._miniupnpd(node)
            elif node.kind == "carrier":
                self._ns(n, "nft", "-f", "-", stdin=_carrier_rules())
        self._save()

    def _daemon(self, node: str, argv: list[str], label: str) -> subprocess.Popen:
        log = open(STATE_DIR / self.name / f"{node}-{label}.log", "wb")  # noqa: SIM115 - the child keeps it
        root = str(Path(__file__).resolve().parents[3])
        proc = subprocess.Popen(
            self.argv(node, argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=root,
        )  # fmt: skip
        log.close()
        self.state["pids"].append(proc.pid)
        self._save()
        return proc

    def _miniupnpd(self, node: Node) -> None:
        if shutil.which("miniupnpd") is None:
            raise LabError("this topology needs miniupnpd (apt-get install miniupnpd-nftables)")
        lan = lan_prefix(node.index)
        ipv6 = bool(node.home and node.home.ipv6)
        # an IPv6 home: miniupnpd also opens pinholes (UPnP WANIPv6FirewallControl, PCP over IPv6).  No
        # ipv6_listening_ip: given one, 2.3.1 binds its HTTP port to that IPv6 address alone, and IPv4
        # control points (the port mappings) find no IGD; without, it listens on both families of br0
        six = ["ipv6_disable=no", "ext_ifname6=wan0"]
        conf = STATE_DIR / self.name / f"{node.name}-miniupnpd.conf"
        conf.write_text(
            "\n".join(
                [
                    "ext_ifname=wan0",
                    "listening_ip=br0",
                    f"http_port={UPNP_HTTP_PORT}",
                    "enable_natpmp=yes",
                    "enable_upnp=yes",
                    *(six if ipv6 else ["ipv6_disable=yes"]),
                    "secure_mode=yes",
                    "system_uptime=yes",
                    "notify_interval=30",
                    "clean_ruleset_interval=600",
                    "min_lifetime=60",
                    "max_lifetime=86400",
                    f"uuid=6b2c3f1e-0000-4000-8000-00000000{node.index:04d}",
                    f"allow 1024-65535 {lan}.0/24 1024-65535",
                    "deny 0-65535 0.0.0.0/0 0-65535",
                    "",
                ]
            )
        )
        pid = STATE_DIR / self.name / f"{node.name}-miniupnpd.pid"
        self._daemon(node.name, ["miniupnpd", "-d", "-f", str(conf), "-P", str(pid)], "miniupnpd")
        self._listening(node.name, UPNP_HTTP_PORT, "miniupnpd")

    def _listening(self, node: str, port: int, label: str, timeout: float = 15.0) -> None:
        """Wait until a daemon of ``node`` listens on TCP ``port``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f":{port} " in self._ns(node, "ss", "-ltnH"):
                return
            time.sleep(0.05)
        log = (STATE_DIR / self.name / f"{node}-{label}.log").read_text(errors="replace")[-400:]
        raise LabError(f"{label} on {node} did not start: {log}")


def _router_rules(node: Node, delay: bool) -> str:
    home = node.home
    assert home is not None  # noqa: S101 - routers always belong to a home (plan)
    lan = lan_prefix(node.index)
    random = " fully-random" if home.nat == "symmetric" else ""
    redirect = (
        f'        iifname "br0" ip daddr != {lan}.0/24 meta l4proto tcp redirect to :{DELAY_PORT}\n' if delay else ""
    )
    return f"""
table inet filter {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "br0" accept
        jump miniupnpd
    }}
    chain miniupnpd {{
    }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
{redirect}    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "wan0" meta nfproto ipv4 masquerade{random}
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""


def _carrier_rules() -> str:
    return """
table ip carrier {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan0" accept
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "wan0" masquerade
    }
}
"""


def down(name: str, state: dict | None = None) -> bool:
    """Remove every process and namespace of lab ``name``; False when there was none."""
    _check_name(name)
    path = _state_file(name)
    if state is None:
        try:
            state = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            state = None
    prefix = f"{PREFIX}-{name}-"
    try:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    namespaces = {line.split()[0] for line in listed.splitlines() if line.startswith(prefix)}
    if state:
        namespaces |= set(state.get("created", [])) & {line.split()[0] for line in listed.splitlines() if line}
    pids: set[int] = set(state.get("pids", []) if state else [])
    for ns in namespaces:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            pids |= {int(p) for p in out.stdout.split() if p.isdigit()}
    pids.discard(os.getpid())
    _stop(pids)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=COMMAND_TIMEOUT)
    with contextlib.suppress(OSError, LabError, subprocess.TimeoutExpired), _congestion_lock():
        _narrow_congestion()
    path.unlink(missing_ok=True)
    shutil.rmtree(STATE_DIR / name, ignore_errors=True)
    return bool(namespaces or state)


@contextlib.contextmanager
def _congestion_lock() -> Iterator[None]:
    """The machine-wide lock over ``tcp_allowed_congestion_control`` and the namespaces' choice
    of it; waits at most ``CC_LOCK_SECONDS`` (LabError)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CC_LOCK, "a") as f:
        deadline = time.monotonic() + CC_LOCK_SECONDS
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another lab held {CC_LOCK} for {CC_LOCK_SECONDS:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_congestion(congestion: str) -> None:
    if congestion not in (known := AVAILABLE_CC.read_text().split()):
        raise LabError(f"this kernel has no TCP congestion control {congestion!r} (it has {', '.join(known)})")


def set_congestion(namespaces: list[str], congestion: str) -> None:
    """Each of ``namespaces`` (made already, so that no :func:`down` narrows the list meanwhile)
    sends TCP with ``congestion`` (LabError if this kernel has none of that name), added to the
    machine's ``tcp_allowed_congestion_control`` if missing (the last :func:`down` puts the list
    back)."""
    _check_congestion(congestion)
    with _congestion_lock():
        allowed = ALLOWED_CC.read_text().strip()
        if congestion not in allowed.split():
            if not CC_BEFORE.exists():  # first: the last down() puts it back whatever happens next
                CC_BEFORE.write_text(allowed)
            ALLOWED_CC.write_text(f"{allowed} {congestion}\n")
        for ns in namespaces:
            _sysctl(ns, "net.ipv4.tcp_congestion_control", congestion)


def _sysctl(namespace: str, key: str, value: str) -> None:
    """Set sysctl ``key`` (dotted) to ``value`` inside ``namespace``."""
    _sh("ip", "netns", "exec", namespace, "sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")


def _narrow_congestion() -> None:
    """Put the machine's ``tcp_allowed_congestion_control`` back as it was before the first lab
    widened it, once no lab namespace is left (call with :func:`_congestion_lock` held)."""
    if not CC_BEFORE.exists():
        return
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT).stdout
    if any(line.startswith(f"{PREFIX}-") for line in listed.splitlines()):
        return  # another lab is up: the last one down puts it back
    ALLOWED_CC.write_text(CC_BEFORE.read_text().strip() + "\n")
    CC_BEFORE.unlink()


def _stop(pids: set[int], grace: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for pid in list(pids):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # reap our own children
                if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                    pids.discard(pid)
            if not pids:
                return
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def labs() -> list[str]:
    """Names of the labs whose state files exist."""
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []
