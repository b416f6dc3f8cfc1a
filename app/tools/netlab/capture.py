"""What crossed a lab link: TCP streams rebuilt from a packet capture (pcap), for checks and benches.

Contract
--------
``Capture(lab, node, iface, port)`` runs ``tcpdump`` in ``node``'s namespace on ``iface`` (every
byte of every packet, to or from TCP ``port``) into a pcap file; ``start()`` returns once tcpdump
listens (bounded), ``stop()`` ends it (SIGTERM, bounded, then killed) and returns
:func:`read_pcap` of what it wrote, and ``dropped`` is what tcpdump said the kernel dropped (a
capture with drops cannot prove anything about the bytes it missed; callers check it is 0).
tcpdump runs in immediate mode and writes each packet as it arrives: without it libpcap hands
packets over in blocks, one per second, and a SIGTERM ends tcpdump without reading the block in
progress, so the last second's packets were lost without counting as dropped.  Even so a packet
reaches the file a little after it crossed, so a caller that needs some packets in the capture
waits for them there before ``stop()``: ``wait(until, timeout)`` polls (bounded) what tcpdump has
written so far (``written()``) until ``until(streams)`` holds, and says whether it did.

``read_pcap(path)`` reads a classic pcap file (Ethernet, IPv4; either byte order, micro- or
nanosecond stamps) and rebuilds each TCP direction's byte stream from sequence numbers (a
retransmission lands on the bytes it repeats; overlaps keep the first copy): a :class:`Stream`
per ``(src, sport, dst, dport)`` with its ``data``, whether its SYN, FIN and RST were seen and
``gaps`` (bytes never captured between the first and the last seen, or the FIN); a last record
cut short (a file still being written) is left out.  ``connections(streams,
port)`` pairs the two directions of each connection to ``port``: ``(to_port, from_port)``.
Standard library only; nothing of the captured bytes is interpreted here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

START_TIMEOUT = 10.0  # seconds for tcpdump to say it listens
STOP_TIMEOUT = 10.0  # seconds for it to flush and end after SIGTERM
WAIT_POLL = 0.1  # seconds between two reads of the pcap file in Capture.wait


class CaptureError(Exception):
    """The capture could not be made or read."""


@dataclass
class Stream:
    src: str
    sport: int
    dst: str
    dport: int
    syn: bool = False
    fin: bool = False
    rst: bool = False  # the connection was reset from this side (a socket closed with unread data)
    gaps: int = 0
    data: bytes = b""
    _isn: int | None = None
    _fin_at: int | None = None  # the FIN's place in the stream: every byte before it was sent
    _pieces: dict[int, bytes] = field(default_factory=dict)

    def _add(self, seq: int, flags: int, payload: bytes) -> None:
        if flags & 0x02:  # SYN: the stream's bytes start at isn + 1
            self.syn = True
            self._isn = seq
            return
        if flags & 0x01:
            self.fin = True
            if self._isn is not None:
                self._fin_at = (seq - self._isn - 1 + len(payload)) % (1 << 32)
        if flags & 0x04:
            self.rst = True
        if payload and self._isn is not None:
            at = (seq - self._isn - 1) % (1 << 32)
            if len(payload) > len(self._pieces.get(at, b"")):
                self._pieces[at] = payload

    def _join(self) -> None:
        out = bytearray()
        for at in sorted(self._pieces):
            piece = self._pieces[at]
            if at > len(out):
                self.gaps += at - len(out)
                out.extend(bytes(at - len(out)))  # a gap stays visible as its length, zero-filled
            if at + len(piece) > len(out):
                out.extend(piece[len(out) - at :])
        if self._fin_at is not None and self._fin_at > len(out):  # bytes sent before the FIN, never seen
            self.gaps += self._fin_at - len(out)
            out.extend(bytes(self._fin_at - len(out)))
        self.data = bytes(out)
        self._pieces.clear()


def read_pcap(path: str | Path) -> dict[tuple[str, int, str, int], Stream]:
    raw = Path(path).read_bytes()
    if len(raw) < 24:
        raise CaptureError(f"{path}: not a pcap file (too short)")
    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise CaptureError(f"{path}: not a classic pcap file (magic {magic.hex()})")
    (linktype,) = struct.unpack(order + "I", raw[20:24])
    if linktype != 1:
        raise CaptureError(f"{path}: link type {linktype}, only Ethernet (1) is read")
    record = struct.Struct(order + "IIII")
    streams: dict[tuple[str, int, str, int], Stream] = {}
    at = 24
    while at + record.size <= len(raw):
        _sec, _frac, incl, _orig = record.unpack_from(raw, at)
        if at + record.size + incl > len(raw):
            break  # cut short: tcpdump is still writing it (or was killed while it did)
        frame = raw[at + record.size : at + record.size + incl]
        at += record.size + incl
        _packet(frame, streams)
    for s in streams.values():
        s._join()
    return streams


def _packet(frame: bytes, streams: dict[tuple[str, int, str, int], Stream]) -> None:
    if len(frame) < 14:
        return
    ethertype, off = struct.unpack_from(">H", frame, 12)[0], 14
    if ethertype == 0x8100 and len(frame) >= 18:  # one VLAN tag
        ethertype, off = struct.unpack_from(">H", frame, 16)[0], 18
    if ethertype != 0x0800 or len(frame) < off + 20:
        return
    ihl = (frame[off] & 0x0F) * 4
    total = struct.unpack_from(">H", frame, off + 2)[0]
    if frame[off + 9] != 6 or ihl < 20:
        return
    end = off + total if total else len(frame)  # 0: a segmentation-offloaded packet, as long as captured
    src = str(ipaddress.IPv4Address(frame[off + 12 : off + 16]))
    dst = str(ipaddress.IPv4Address(frame[off + 16 : off + 20]))
    tcp = off + ihl
    if len(frame) < tcp + 20:
        return
    sport, dport, seq = struct.unpack_from(">HHI", frame, tcp)
    data_off = (frame[tcp + 12] >> 4) * 4
    flags = frame[tcp + 13]
    payload = frame[tcp + data_off : min(end, len(frame))]
    key = (src, sport, dst, dport)
    stream = streams.get(key)
    if stream is None:
        stream = streams[key] = Stream(src, sport, dst, dport)
    stream._add(seq, flags, payload)


def connections(streams: dict[tuple[str, int, str, int], Stream], port: int) -> list[tuple[Stream, Stream | None]]:
    """Each connection to ``port`` as (the dialler's bytes, the answer's bytes or None)."""
    out = []
    for (src, sport, dst, dport), up in sorted(streams.items()):
        if dport == port:
            out.append((up, streams.get((dst, dport, src, sport))))
    return out


class _Lab(Protocol):
    def argv(self, node: str, argv: list[str]) -> list[str]: ...


class Capture:
    def __init__(self, lab: _Lab, node: str, iface: str, port: int, path: str | Path) -> None:
        self.lab, self.node, self.iface, self.port, self.path = lab, node, iface, port, Path(path)
        self.dropped: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = self.path.with_suffix(".log")

    def start(self) -> None:
        if shutil.which("tcpdump") is None:
            raise CaptureError("the capture needs tcpdump (apt-get install tcpdump)")
        argv = ["tcpdump", "-i", self.iface, "-w", str(self.path), "-U", "--immediate-mode", "-s", "0", "-B", "16384",
                "-n", "-Z", "root", "tcp", "port", str(self.port)]  # fmt: skip
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(self.lab.argv(self.node, argv), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if "listening on" in self._log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self._end()
        raise CaptureError(f"tcpdump did not start: {self._log.read_text(errors='replace')[-300:]}")

    def _end(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def written(self) -> dict[tuple[str, int, str, int], Stream]:
        """:func:`read_pcap` of what tcpdump has written so far ({} before its first packet)."""
        try:
            return read_pcap(self.path)
        except (CaptureError, OSError):
            return {}

    def wait(self, until: Callable[[dict[tuple[str, int, str, int], Stream]], bool], timeout: float) -> bool:
        """Poll :meth:`written` until ``until`` holds of it (True) or ``timeout`` seconds passed or
        tcpdump ended (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if until(self.written()):
                return True
            if time.monotonic() >= deadline or self.proc is None or self.proc.poll() is not None:
                return False
            time.sleep(WAIT_POLL)

    def stop(self) -> dict[tuple[str, int, str, int], Stream]:
        self._end()
        said = self._log.read_text(errors="replace")
        m = re.search(r"(\d+) packets? dropped by kernel", said)
        self.dropped = int(m.group(1)) if m else None
        return read_pcap(self.path)
