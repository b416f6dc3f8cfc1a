"""The machine verbs of `molink`: ``worker`` (serve the layers the master assigns), ``probe`` and
``relay`` (splice members' connections to registered masters: :mod:`worker_core.bridge_server`).

Contract: each command takes the parsed arguments (:func:`app.cli._parser`) and the control
channel (:class:`app.cli.command.Supervision`) and returns its exit code, or the coroutine function
that :func:`app.cli.main` runs until it ends, Ctrl-C or SIGTERM.  ``worker`` turns its
arguments and, for a paired machine, the joined group's folder (membership, identity, pinned
master certificate) into a :class:`~worker_core.config.WorkerConfig`; an unknown device or a
folder that joined no group raises ``ValueError`` before anything starts.  A group with a relay
(``--relay``, else the one the group named at joining): the relay is one more candidate of the
master, raced after the direct ones at every dial (:func:`worker_core.worker.pick_path`: LAN,
then direct, then relay); with ``--via-relay`` it is the only one.  The worker's hop listener
registers at that relay too (``WorkerConfig.relay``), so the previous stage can reach it there.  ``probe`` prints
what this machine offers (or ``--json``) and exits 0.  Torch and the engine are imported only
inside the command.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from worker_core.config import WorkerConfig

if TYPE_CHECKING:
    from .command import Run, Supervision


def worker(args: argparse.Namespace, sup: Supervision) -> Run:
    from worker_core import device
    from worker_core.worker import serve

    device.pick(args.device)  # fail fast on a device that does not exist
    tls, identity, master, folder, name = None, None, args.master, None, args.name
    candidates: tuple[str, ...] = ()
    relay, group = "", ""
    if master is None:
        from app.group.client import data_dir
        from worker_core.identity import client_context, load_or_create
        from worker_core.pairing import JoinedGroup, PairingError

        folder = data_dir(args.data_dir)
        try:
            joined = JoinedGroup.load(folder)
        except PairingError as e:
            raise ValueError(str(e)) from None
        identity = load_or_create(folder / "identity", joined.name)
        tls = client_context(identity, joined.master_cert)
        master = joined.master_address if joined.master_host else ""
        candidates = joined.candidates
        name = name or joined.name
        relay, group = args.relay or joined.relay, identity_fingerprint(joined.master_cert)
        if not master and not relay:
            raise ValueError(f"the membership in {folder} names no master address and no relay: join again")
    wcfg = WorkerConfig(
        master=master,
        candidates=candidates,
        tls=tls,
        identity=identity,
        direct=args.direct,
        hop_listen=args.hop_listen,
        hop_port=args.hop_port,
        hop_host=args.hop_host,
        port_mapping=args.port_mapping,
        weights_dir=folder / "weights" if folder else None,
        device=args.device,
        link_delay_ms=args.link_delay_ms,
        link_mbps=args.link_mbps,
        threads=args.threads,
        memory_limit=int(args.memory_limit * 1e9) if args.memory_limit else None,
    )
    if name:
        wcfg = dataclasses.replace(wcfg, name=name)
    if args.via_relay and not relay:
        raise ValueError("--via-relay needs a relay (--relay HOST:PORT, or a group that names one)")
    if relay:
        from worker_core.address import parse_address
        from worker_core.candidates import Candidate, Kind

        via = Candidate(Kind.RELAY, *parse_address(relay)).to_text()
        others = () if args.via_relay else tuple(c for c in candidates if not c.startswith("relay~"))
        wcfg = dataclasses.replace(
            wcfg, master="" if args.via_relay else master, candidates=(*others, via), group=group, relay=relay
        )
    return lambda: serve(wcfg, sup.control, sup.events)


def identity_fingerprint(pem: str) -> str:
    from worker_core.identity import fingerprint

    return fingerprint(pem)


def relay(args: argparse.Namespace, sup: Supervision) -> Run:
    """``molink relay``: run a relay until stopped (no model, no torch)."""
    from worker_core.bridge_server import BridgeLimits, BridgeServer
    from worker_core.bridge_wire import split_address

    host, port = split_address(args.listen, listen=True)
    limits = BridgeLimits()
    if args.max_connections is not None:
        limits = dataclasses.replace(limits, max_connections=args.max_connections)
    if args.session_mbps is not None:
        limits = dataclasses.replace(limits, session_rate=args.session_mbps * 1e6 / 8)
    if args.total_mbps is not None:
        limits = dataclasses.replace(limits, global_rate=args.total_mbps * 1e6 / 8)
    if limits.max_connections < 1 or limits.session_rate <= 0 or limits.global_rate <= 0:
        raise ValueError("relay limits must be positive")

    async def serving() -> None:
        import asyncio

        server = BridgeServer(limits)
        await server.start(host, port)
        print(f"relay listening on {host}:{server.port}", flush=True)
        mapper, outside = None, ""
        if args.map_port:
            from worker_core.address import format_address
            from worker_core.portmap import PortMapper

            mapper = PortMapper(server.port)
            m = await mapper.start()
            if m is not None and m.reachable:
                outside = format_address(m.external_host, m.external_port)
                print(f"relay reachable from outside at {outside} (mapped on your router)", flush=True)
            else:
                why = f"the router's address {m.external_host} is behind another NAT" if m else mapper.failure
                print(f"relay port not mapped: {why or 'no answer'}", flush=True)
        if sup.events is not None:
            sup.events.emit("listening", host=host, port=server.port, outside=outside)
        try:
            if sup.control is not None:  # supervised: until the control channel says stop (or closes)
                await sup.control.next()
            else:
                await asyncio.Event().wait()
        finally:
            if mapper is not None:
                await mapper.stop()  # the router forgets the mapping (bounded)
            await server.stop()

    return serving


def probe(args: argparse.Namespace, sup: Supervision) -> int:
    import json

    from worker_core.probe import probe as measure

    group_dir = None
    if args.master is None:
        from app.group.client import data_dir
        from worker_core.pairing import MEMBERSHIP_FILE

        candidate = data_dir(args.data_dir)
        group_dir = candidate if (candidate / MEMBERSHIP_FILE).exists() else None
    pr = measure(args.device, args.master, group_dir)
    if args.json:
        print(json.dumps(pr.as_dict(), indent=2))
        return 0
    gib = 2**30
    for g in pr.gpus:
        print(
            f"GPU {g.index}: {g.name}, {g.free_memory / gib:.1f} of {g.total_memory / gib:.1f} GiB free, "
            f"compute {g.compute_capability}, driver {g.driver}"
        )
    if not pr.gpus:
        print("GPU: none found (no NVIDIA driver): a worker here computes on the CPU")
    ram = f"RAM {pr.ram_available / gib:.1f} of {pr.ram_total / gib:.1f} GiB available"
    print(f"CPU: {pr.cpu}, {pr.cpu_cores} cores; {ram}")
    print(f"compute: {pr.device} in {pr.dtype}, {pr.matmul_gflops:.1f} GFLOP/s measured (128x2048 @ 2048x2048)")
    print(_layers_held_line(pr.offered, 4 if pr.dtype == "float32" else 2))
    if args.master or group_dir:
        where = args.master or "the group's master"
        link = f"{pr.rtt_ms:.1f} ms round trip" if pr.rtt_ms is not None else "unreachable"
        if pr.bandwidth_mbps is not None:
            link += f", {pr.bandwidth_mbps:.0f} Mbit/s download"
        print(f"link to {where}: {link}")
    return 0


def _layers_held_line(offered: int, itemsize: int) -> str:
    """What ``offered`` bytes hold of common models at each precision, in the planner's own bytes."""
    from master_core.placement import layers_held
    from master_core.simulator import REFERENCE_MODELS
    from worker_core.precision import Precision

    models = "; ".join(
        f"{name} {' / '.join(str(layers_held(dims.shape(p, itemsize), offered)) for p in Precision)}"
        f" of {dims.num_layers}"
        for name, dims in REFERENCE_MODELS.items()
    )
    return f"offers {offered / 2**30:.1f} GiB; layers it would hold at none / int8 / int4: {models}"
