"""A link with a real round trip between two network namespaces: TUN devices, each packet held in
user space, so TCP sees the delay end to end.

Contract
--------
``with DelayLine(name, delay_s, mbps, congestion="cubic") as line:`` makes two namespaces, ``line.a`` and ``line.b``
(a lab's names, ``mlk-<name>-a`` and ``-b``), joined by one point-to-point link: ``A_ADDRESS`` in ``a``,
``B_ADDRESS`` in ``b``.  Each side's egress is a TUN device limited by ``tbf`` to ``mbps`` with a
200 ms queue (a home router's uplink), and TCP sent with ``congestion`` (as a lab's, see
:func:`~app.tools.netlab.lab.set_congestion`; CUBIC is Windows' and Linux's default); a thread
in this process reads every IP packet each side sends and writes it to the other side
``delay_s`` seconds later, in order.  Nothing else is routed: the namespaces have no interface
to the real network.  ``line.run(node, argv)`` and
``line.spawn(node, argv, **popen)`` run a program on host ``"a"`` or ``"b"`` as a lab's
:class:`~app.tools.netlab.lab.Hosts` (so a line stands where a lab's hosts are used, as in
:mod:`app.tools.netlab.burstlab`).  Leaving the block stops the thread (bounded), then
:func:`~app.tools.netlab.lab.down` removes every process left in the namespaces and the
namespaces, whatever happened (entering does so first, for what a killed run left; ``molink lab
down <name>`` does it from outside).  Root and Linux only (as the lab,
:func:`~app.tools.netlab.lab.unavailable`).

Why: this kernel has no ``netem``, and the lab's delay (:mod:`app.tools.netlab.delay`) is a
proxy that ends each TCP connection at the router, so a sender never sees the round trip; what
reads the connection's own ``TCP_INFO`` (the in-flight gate, :mod:`worker_core.inflight`) needs
the delay inside its connection.  The copy is stdlib only and moves a few thousand packets a
second: enough for tens of Mbit/s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import threading
import time
from collections import deque

from .lab import PREFIX, Hosts, LabError, _check_name, _sh, down, set_congestion

A_ADDRESS, B_ADDRESS = "10.77.0.1", "10.77.0.2"
QUEUE = "200ms"  # tbf's queue on each side's egress: a home router's buffer
JOIN_SECONDS = 5.0  # bound on waiting for the copying thread to end
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_READS = 64  # packets read from one side before the other is served


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class DelayLine(Hosts):
    """Two namespaces joined by a delayed, rate-limited link (see the module docstring)."""

    def __init__(self, name: str, delay_s: float, mbps: float, congestion: str = "cubic") -> None:
        self.name = _check_name(name)
        self.congestion = congestion
        self.a, self.b = f"{PREFIX}-{name}-a", f"{PREFIX}-{name}-b"
        self.delay, self.mbps = delay_s, mbps
        self.forwarded = 0  # packets copied (diagnostics)
        self._fds: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DelayLine:
        down(self.name)  # what a killed run of this name left
        try:
            for side, ns, me, peer in (("a", self.a, A_ADDRESS, B_ADDRESS), ("b", self.b, B_ADDRESS, A_ADDRESS)):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                dev = f"{PREFIX}{self.name}{side}"  # made in this namespace (unique here), then moved
                self._fds.append(_tun(dev))  # the descriptor follows the device
                _sh("ip", "link", "set", dev, "netns", ns)
                _sh("ip", "-n", ns, "addr", "add", me, "peer", peer, "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                    f"{self.mbps}mbit", "burst", "32kbit", "latency", QUEUE)  # fmt: skip
            set_congestion([self.a, self.b], self.congestion)
            self._thread = threading.Thread(target=self._copy, name="delay-line", daemon=True)
            self._thread.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        down(self.name)

    def argv(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` run in host ``node`` ("a" or "b")."""
        if node not in ("a", "b"):
            raise LabError(f"a delay line has hosts a and b, not {node!r}")
        return ["ip", "netns", "exec", self.a if node == "a" else self.b, *argv]

    def _copy(self) -> None:
        """Each side's packets to the other, ``delay`` later, in order (a constant delay: FIFO)."""
        fa, fb = self._fds
        other = {fa: fb, fb: fa}
        held: dict[int, deque[tuple[float, bytes]]] = {fa: deque(), fb: deque()}  # by the side they go to
        while not self._stop.is_set():
            due = [q[0][0] for q in held.values() if q]
            wait = min(0.1, max(0.0, min(due) - time.monotonic())) if due else 0.1
            ready, _, _ = select.select([fa, fb], [], [], wait)
            now = time.monotonic()
            for fd in ready:
                for _ in range(_READS):
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    held[other[fd]].append((now + self.delay, packet))
            now = time.monotonic()
            for fd, q in held.items():
                while q and q[0][0] <= now:
                    with contextlib.suppress(OSError):  # the side's queue is full: dropped, as a router would
                        os.write(fd, q.popleft()[1])
                    self.forwarded += 1
