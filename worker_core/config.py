"""The worker's one typed configuration; defaults documented beside each field.

Contract: built once per process (by the command line, the app or a test) and read by
:func:`worker_core.worker.serve`; nothing in ``worker_core`` reads ``os.environ``.  Light to
import (no torch): the command line takes its defaults from here.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from .identity import Identity

HOP_PORT = 7734  # a paired worker's hop listener, when free: one port a firewall rule can name


@dataclass(frozen=True)
class WorkerConfig:
    master: str  # "host:port" of the master's tunnel endpoint
    # a paired group: every address of the master's group port (Candidate.to_text(),
    # worker_core.candidates); each tunnel dial races them and uses the first whose pinned TLS checks
    candidates: tuple[str, ...] = ()
    # the master's certificate fingerprint: a ``relay`` candidate is dialled through the relay by it
    group: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    name: str = field(default_factory=socket.gethostname)
    reconnect: bool = True  # dial again after the tunnel drops
    heartbeat: float = 5.0  # seconds between pings; a dead master is noticed within ~2x this
    retry_seconds: float = 1.0  # first reconnect delay, doubled up to 30 s
    link_delay_ms: float = 0.0  # emulated one-way delay per direction (measurement only)
    link_mbps: float | None = None  # emulated bandwidth per direction in Mbit/s (None: unlimited)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    memory_limit: int | None = None  # bytes offered to the group (None: all that is free)
    tls: ssl.SSLContext | None = None  # paired group: mutual TLS pinned to the master (None: plain, loopback only)
    weights_dir: Path | None = None  # cache of weights the master delivers (None: the user cache)
    identity: Identity | None = None  # paired group: this machine's certificate, presented on direct hops
    # direct hops (worker_core.hops): listen for the previous stage and dial the next one where the
    # master finds it reachable; off: every activation goes through the master
    direct: bool = True
    # with direct hops, also listen (False: dial the next stage only, no inbound port: no firewall
    # prompt on Windows; the hop into this stage is relayed)
    hop_listen: bool = True
    hop_bind: str = ""  # address the hop listener binds ("": "::", IPv4 and IPv6, in a paired group, else 127.0.0.1)
    hop_port: int | None = None  # its port (None: HOP_PORT in a paired group, else any free one; 0: any)
    hop_host: str = ""  # host the other stages should dial ("": the address the master sees)
    # in a paired group, with a listener on every interface and no ``hop_host``: ask the home
    # router to map the hop port (UPnP, NAT-PMP, PCP), so a stage in another home can dial it
    port_mapping: bool = True
    # the group's relay ("host:port", "": none), paired groups: the hop listener registers there
    # under this member's own certificate fingerprint (whatever else reaches it), so the previous
    # stage can reach it through the relay when no direct address answers (worker_core.hops)
    relay: str = ""
