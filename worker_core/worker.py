"""The worker process: dial out to the master, announce, load the assigned layers, serve steps.

Contract
--------
``serve(config, control=None, events=None)`` runs until cancelled (or, with
``reconnect=False``, until the tunnel closes).  Supervised (``control`` given, see
:mod:`worker_core.control`), a ``stop`` or ``finish`` command makes a connected worker send
``Leave`` and wait (bounded) for the master to close the tunnel; it never reconnects after
that, and ``serve`` returns (after the ``left`` event).  Not connected, it returns at once.
``events`` receives the worker's events (connecting, connected, serving, stats,
disconnected, left, error).  Per connection: measure the link to the master (round trip, and
bandwidth over a group port), then send :class:`~worker_core.wire.Hello` with it, the device,
its measured speed and its memory; then, in order, apply
``Assign`` (load the layer range, answer ``Ready``), ``Step`` (answer ``Result``, or
``Failure`` naming the step when the step does not fit this stage), and ``Free``.  Frames are
read by one task and executed in arrival order by another, so heartbeats are answered while a
step computes.  A malformed frame from the master closes the tunnel with a log line; the
worker then reconnects.  So does a frame larger than the model allows: until a range is served
only an ``Assign`` or a weight ``Chunk`` fits, then the pipeline's own bound
(:func:`~worker_core.wire.worker_frame_bound`, as the master bounds the worker's frames).
The loaded shard is kept across reconnects when the next assignment
is the same model and range (its KV caches are dropped: the master replays).  What each frame
does is :class:`worker_core.session.Session`'s; this module dials, reads, queues and obeys.

Direct hops (``config.direct``, see :mod:`worker_core.hops`): the worker listens for the previous
stage and announces the port in its ``Hello`` (unless ``config.hop_listen`` is off: then it only
dials, and announces no port); a ``Route`` from the master says who may dial in
and where the next stage listens; the worker dials it (bounded) and answers ``Routed``.  A
``Step`` marked ``forward`` is then sent on to the next stage instead of back to the master (its
``Result`` goes to the master when the hop is down: the master relays it).  Steps arriving over
the hop join the same in-order queue as the master's.  With a relay (``config.relay``, paired
groups) the hop listener also stays registered there under this member's own certificate
(:class:`~worker_core.bridge_host.BridgeHost`, healing after a relay restart) and announces it
(``Hello.hop_relay``), so the previous stage can reach it through the relay when no direct
address answers.  It registers whether or not a direct way in exists: whether the previous
stage can reach a mapped or announced address is known only by its dial, and the registration
costs one idle connection (a ping every 15 s).

In a paired group (``tls`` set) the tunnel is ``wss://`` with this machine's certificate,
trusting only the pinned master certificate, and an ``Assign`` with a manifest is served from
weights the master delivers (``Fetch``/``Chunk``, see :mod:`worker_core.weights`), cached in
``weights_dir`` (for a model from the hub, read from the hub first where this machine can,
see :mod:`worker_core.hub_ranges`); ``Chunk`` frames bypass the in-order queue, since they arrive while that
``Assign`` is being handled.  Without ``tls`` the tunnel is plain ``ws://`` (loopback tests),
with a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp

from . import device as devices
from .address import MemberPath, address_path, format_address, is_loopback, parse_address
from .bridge_host import BridgeHost
from .candidates import DIAL_TIMEOUT, Candidate, Kind, NoPath, is_public, parse_candidate_text, race
from .config import HOP_PORT, WorkerConfig
from .control import FINISH_TIMEOUT, LEAVE_TIMEOUT, Command, Control, Events, one_line
from .hops import HopListener
from .inbox import Inbox
from .inflight import counted, gate
from .listen import EVERY_INTERFACE
from .pieces import Joiner, frame_passes
from .portmap import PortMapper
from .portmap.pinhole import Pinholer
from .probe import WORKER_PROBE_BYTES, device_facts, matmul_gflops, measure_link
from .session import Run, Session
from .shaper import LinkShaper
from .tasks import end_tasks
from .unsent import keep_unsent_low
from .weights import WeightCache
from .wire import (
    DTYPE_NAMES,
    MAX_FRAME_BYTES,
    Chunk,
    Failure,
    Hello,
    Leave,
    ProtocolError,
    Step,
)

log = logging.getLogger("molink.worker")

MAX_RETRY_SECONDS = 30.0  # the longest wait between two attempts to reach the master
STABLE_TUNNEL = 10.0  # seconds a tunnel must last for the next reconnect to start quick again
BETTER_PATH_EVERY = 30.0  # seconds between two looks for a direct path while the tunnel is relayed
BETTER_PATH_IDLE = 10.0  # seconds without a step before a relayed tunnel moves to a direct path
# frames from the master waiting to be executed (beside the one running): a master has at most its
# micro-batch lanes' steps, coalesced Frees and MAX_FETCHES weight chunks out, far below this; more
# is a broken master, and the tunnel closes as a protocol error rather than queueing without bound
MAX_QUEUED_FRAMES = 256


async def _link(config: WorkerConfig) -> tuple[float, float]:
    """(round trip ms, Mbit/s) to the master as the tunnel will see it: measured just before
    dialling (0 where unknown), with an emulated delay and rate applied on top."""
    rtt, mbps = await measure_link(
        f"{'https' if config.tls else 'http'}://{config.master}", config.tls, WORKER_PROBE_BYTES
    )
    rtt = (rtt or 0.0) + (2 * config.link_delay_ms if rtt is not None else 0.0)
    if config.link_mbps:
        mbps = min(mbps, config.link_mbps) if mbps else config.link_mbps
    return rtt, mbps or 0.0


async def pick_path(config: WorkerConfig, relay: bool = True) -> Candidate | None:
    """The way to the master: its candidates (and ``config.master``, the address paired with)
    raced (happy eyeballs: LAN, then direct, then relay) up to a TLS handshake pinned to the
    master, so only the winner carries the tunnel and its Hello.  A ``relay`` candidate is dialled
    through the relay by ``config.group`` (the master's fingerprint) and its TLS runs over the
    splice (``relay`` False: none is tried).  None when none answers (or nothing can be parsed)."""
    from .bridge_dial import open_bridged_tls
    from .pairing import TUNNEL_SNI

    try:
        listed = parse_candidate_text(",".join(config.candidates))
        if config.master:
            host, port = parse_address(config.master)
            listed.append(Candidate(Kind.MAPPED if is_public(host) else Kind.LAN, host, port))
    except ValueError:
        return None
    if not (config.group and relay):
        listed = [c for c in listed if c.kind is not Kind.RELAY]

    async def handshake(c: Candidate) -> asyncio.StreamWriter:
        if c.kind is Kind.RELAY:
            assert config.tls is not None  # noqa: S101 - only paired workers race (see _connect_once)
            _reader, writer = await open_bridged_tls(c.address, config.tls, TUNNEL_SNI, group=config.group)
            return writer
        _reader, writer = await asyncio.open_connection(
            c.host, c.port, ssl=config.tls, server_hostname=TUNNEL_SNI, ssl_handshake_timeout=DIAL_TIMEOUT
        )
        return writer

    try:
        chosen, writer = await race(listed, handshake, discard=lambda w: w.close())
    except NoPath as e:  # a look for a better path than the relay finding none is no news
        log.log(logging.WARNING if relay else logging.DEBUG, "no address of the master answered (%s)", e)
        return None
    writer.close()
    if chosen.address != config.master:
        log.info("reaching the master at %s (%s)", chosen.address, chosen.kind.value)
    return chosen


async def _connect_once(
    config: WorkerConfig, executor: ThreadPoolExecutor, shards: dict, facts: dict, weights: WeightCache, run: Run
) -> str:
    """One tunnel, from choosing the path (:func:`pick_path`, each time: a better path that
    appeared, or a relay that restarted, is taken at the next dial) to its end; returns why it
    ended.  A relay that wins is reached through a local :class:`~.bridge_dial.BridgeForwarder`
    for this tunnel's life (the probe and the tunnel dial it unchanged); while it carries the
    tunnel, :func:`_better_path` looks for a direct one, and the tunnel moves there (it ends; the
    next dial takes the direct path) once one answers while no step has run for a while."""
    if not (config.candidates and config.tls is not None):
        return await _tunnel(config, executor, shards, facts, weights, run, path_to(config.master))
    chosen = await pick_path(config)
    if chosen is None:
        if not config.master:
            raise ConnectionError("no address of the master and no relay answered")
        return await _tunnel(config, executor, shards, facts, weights, run, path_to(config.master))
    if chosen.kind is not Kind.RELAY:
        direct = dataclasses.replace(config, master=chosen.address)
        return await _tunnel(direct, executor, shards, facts, weights, run, path_to(chosen.address))
    from .bridge_dial import BridgeForwarder

    async with BridgeForwarder(chosen.address, group=config.group) as forwarder:
        log.info("reaching the master through relay %s", chosen.address)
        relayed = dataclasses.replace(config, master=forwarder.address)
        path = f"relayed through {chosen.address}"
        return await _tunnel(relayed, executor, shards, facts, weights, run, path, lambda: _better_path(config, run))


async def _better_path(config: WorkerConfig, run: Run) -> str:
    """Return (why) once a direct way to the master answers its pinned handshake while the
    worker is idle (no step for ``BETTER_PATH_IDLE`` seconds: moving costs the group a re-plan
    and the stage's caches, so never mid-stream); looks every ``BETTER_PATH_EVERY`` seconds
    (each look bounded by the race's own timeouts).  Runs until cancelled otherwise."""
    steps, quiet_since = run.steps, time.monotonic()
    while True:
        await asyncio.sleep(BETTER_PATH_EVERY)
        now = time.monotonic()
        if run.steps != steps:
            steps, quiet_since = run.steps, now
        if now - quiet_since < BETTER_PATH_IDLE:
            continue
        chosen = await pick_path(config, relay=False)
        if chosen is not None and run.steps == steps:
            log.info(
                "a direct path to the master answers (%s, %s): moving the tunnel off the relay",
                chosen.kind.value,
                chosen.address,
            )
            return f"moving to a direct path ({chosen.kind.value} {chosen.address})"


def path_to(master: str) -> str:
    """How a tunnel to ``master`` (HOST:PORT) goes, for people: "this PC", "LAN", "IPv6" or
    "direct" (:func:`~.address.address_path`: the words the master uses for its members)."""
    try:
        path = address_path(parse_address(master)[0])
    except ValueError:
        return MemberPath.DIRECT.value
    return (MemberPath.DIRECT if path is MemberPath.UNKNOWN else path).value  # a host name: not known here


async def _tunnel(
    config: WorkerConfig,
    executor: ThreadPoolExecutor,
    shards: dict,
    facts: dict,
    weights: WeightCache,
    run: Run,
    path: str,
    watch: Callable[[], Awaitable[str]] | None = None,
) -> str:
    """One tunnel to ``config.master``, from dialling to its end, reported (the ``connected``
    event) as going by ``path``; returns why it ended.  ``watch``, run beside it once connected,
    ends the tunnel (closed as going away) when it returns, with its return as the reason."""
    run.events.emit("connecting", master=config.master)
    info = devices.pick(config.device)
    offered = info.free_memory if config.memory_limit is None else min(info.free_memory, config.memory_limit)
    rtt, mbps = await _link(config)
    if config.tls is not None:
        from .pairing import TUNNEL_SNI

        url, tls = f"wss://{config.master}/v1/tunnel", {"ssl": config.tls, "server_hostname": TUNNEL_SNI}
    else:
        url, tls = f"ws://{config.master}/v1/tunnel", {}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            url, max_msg_size=MAX_FRAME_BYTES, compress=0, heartbeat=config.heartbeat, autoping=False, **tls
        ) as ws,
    ):
        log.info("connected to %s as %r on %s (%s)", config.master, config.name, info.device, info.name)
        keep_unsent_low(ws)  # the outbox orders what waits: let it wait there, not in the kernel
        run.connected = True
        run.events.emit("connected", master=config.master, path=path)
        delay = config.link_delay_ms / 1000.0
        rate = config.link_mbps * 1e6 / 8 if config.link_mbps else None
        out = gate(ws)  # the tunnel's in-flight gate, told of every frame handed to the tunnel
        uplink = LinkShaper(delay, rate, counted(ws.send_bytes, out))
        session = Session(ws, executor, shards, config.device, uplink, weights, run, config, out)
        queue = Inbox(lambda: session.runner.kv.length if session.runner is not None else None)  # decodes first

        def hopped(step: Step) -> None:  # a step the previous stage sent straight here
            if queue.qsize() >= MAX_QUEUED_FRAMES:  # the master is told at once, instead of waiting out a deadline
                log.error("the previous stage sent more than %d steps ahead of this one: refused", MAX_QUEUED_FRAMES)
                session.post(Failure(f"stage queue full ({MAX_QUEUED_FRAMES} frames): step refused", step.step_id))
                return
            queue.put_nowait(step, time.perf_counter())

        joiner = Joiner()  # the master sends longer frames in pieces too (worker_core.pieces)

        async def arrive(data: bytes) -> None:
            msg: object
            try:
                if (msg := joiner.feed(data, session.max_frame)) is None:
                    return  # a piece: the frame is not whole yet
            except ProtocolError as e:
                msg = e
            if isinstance(msg, Chunk):  # weights arrive while an Assign is being handled
                session.on_chunk(msg)
            else:
                queue.put_nowait(msg, time.perf_counter())

        # what the master sends waits in its queue on a real link, where a decode step passes (pieces.passes)
        downlink = LinkShaper(delay, rate, arrive, lambda frame: frame_passes(frame, session.max_frame))

        async def between() -> None:  # decode steps queued while a longer step pauses between its layers
            await queue.serve_urgent(session.handle)

        session.between = between

        async def execute() -> None:
            while True:
                msg, arrived, urgent = await queue.get()
                try:
                    if isinstance(msg, ProtocolError):
                        raise msg
                    await session.handle(msg, arrived, urgent)
                except ProtocolError as e:
                    log.error("protocol error from the master, closing the tunnel: %s", e)
                    await ws.close(code=1002, message=b"protocol error")
                    return

        reason = "tunnel closed"
        runner_task = stats_task = watch_task = None
        moved = ""

        async def watching(watch: Callable[[], Awaitable[str]]) -> None:
            nonlocal moved
            moved = await watch()
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"moving to a better path")

        try:
            await session.send(
                Hello(
                    config.name[:128],
                    str(info.device),
                    info.name[:256],
                    info.total_memory,
                    offered,
                    _dtype_name(info),
                    rtt_ms=rtt,
                    link_mbps=mbps,
                    hop_lan=_local_address(ws) if run.hops is not None else "",
                    dialled=config.master,
                    **facts,
                )
            )
            run.session = session
            if run.hops is not None:
                run.hops.sink = hopped
            runner_task = asyncio.create_task(execute())
            stats_task = asyncio.create_task(run.report_stats()) if run.events.enabled else None
            watch_task = asyncio.create_task(watching(watch)) if watch is not None else None
            while True:
                frame = await ws.receive()
                if frame.type is aiohttp.WSMsgType.PING:  # answered with the stage's pulse (wire.pulse)
                    await ws.pong(session.pulse())
                    continue
                if frame.type is aiohttp.WSMsgType.PONG:
                    continue
                if frame.type != aiohttp.WSMsgType.BINARY:
                    if frame.type is aiohttp.WSMsgType.CLOSE:
                        why = frame.extra if isinstance(frame.extra, str) and frame.extra else ""
                        reason = "closed by the master: " + (why or f"code {frame.data}")
                        break
                    if frame.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                        reason = f"connection lost: {ws.exception() or frame.type.name.lower()}"
                        break
                    raise ProtocolError(f"unexpected {frame.type.name} frame")
                if queue.qsize() + downlink.backlog >= MAX_QUEUED_FRAMES:
                    raise ProtocolError(f"the master sent more than {MAX_QUEUED_FRAMES} frames ahead of this stage")
                await downlink.put(frame.data)
            if runner_task.done() and not runner_task.cancelled() and (failed := runner_task.exception()):
                raise failed
            reason = moved or reason
        except ProtocolError as e:
            log.error("protocol error from the master, closing the tunnel: %s", e)
            reason = f"protocol error: {e}"
            await ws.close(code=1002, message=str(e)[:100].encode())
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            reason = f"connection lost: {e or type(e).__name__}"
            raise
        finally:
            run.session = None
            if run.hops is not None:
                run.hops.sink = None
                run.hops.accept(-1, "", "")
            await end_tasks(t for t in (runner_task, stats_task, watch_task) if t is not None)
            await session.close_hop()
            await session.close()
            uplink.close()
            downlink.close()
            run.events.emit("disconnected", reason=one_line(reason))
        return reason


def _local_address(ws: aiohttp.ClientWebSocketResponse[bool]) -> str:
    """The address this machine's end of the tunnel has: behind a NAT, its LAN address, where
    a stage on the same LAN can dial its hop listener ("" when unknown)."""
    sock = ws.get_extra_info("sockname")
    host = sock[0] if isinstance(sock, tuple) and sock else ""
    return host.split("%")[0] if isinstance(host, str) else ""


async def _start_hops(hops: HopListener, config: WorkerConfig) -> None:
    """Bind the hop listener: all interfaces in a paired group (other members dial it), loopback
    in a plain one; on ``HOP_PORT`` in a paired group when it is free, else on any port."""
    paired = config.tls is not None
    host = config.hop_bind or (EVERY_INTERFACE if paired else "127.0.0.1")
    port = config.hop_port if config.hop_port is not None else (HOP_PORT if paired else 0)
    try:
        await hops.start(host, port)
    except OSError as e:
        if config.hop_port is not None:
            raise
        log.warning("hop port %d is taken (%s): listening on another one", port, e)
        await hops.start(host, 0)


class _HopMapping:
    """The hop port mapped on the home router while the worker runs, and an IPv6 pinhole to it
    where the listener is on IPv6: ``run.mapped`` follows the mapping the router confirmed
    (public external address only), else the pinholed ``[address]:port``; "" with neither.  One
    address goes to the master (``Routed.mapped``): the IPv4 mapping, which every dialler can
    reach, before the pinhole, which only an IPv6 one can."""

    def __init__(self, port: int, run: Run, ipv6: bool) -> None:
        self.run = run
        self.mapper = PortMapper(port, on_change=lambda _m: self._changed())
        self.pinholer = Pinholer(port, on_change=lambda _h: self._changed()) if ipv6 else None
        self.task = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        await asyncio.gather(*(k.start() for k in (self.mapper, self.pinholer) if k is not None))
        self._changed()

    def _changed(self) -> None:
        m = self.mapper.mapping
        hole = self.pinholer.current if self.pinholer is not None else None
        if m is not None and m.reachable:
            self.run.mapped = format_address(m.external_host, m.external_port)
        elif hole is not None:
            self.run.mapped = format_address(hole.host, hole.port)
        else:
            self.run.mapped = ""
            return
        log.info("hop port open on the router: stages elsewhere dial %s", self.run.mapped)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await asyncio.gather(*(k.stop() for k in (self.mapper, self.pinholer) if k is not None))


def _hop_mapper(hops: HopListener, config: WorkerConfig, run: Run) -> _HopMapping | None:
    """Map the hop port where a stage in another home could need it: a paired group whose
    master is not on this machine, a listener on every interface, no host announced by hand,
    mapping not turned off."""
    everywhere = not config.hop_bind or config.hop_bind in ("0.0.0.0", "::")
    master_here = bool(config.master) and is_loopback(parse_address(config.master)[0])
    if config.tls is None or not everywhere or config.hop_host or not config.port_mapping or master_here:
        return None
    return _HopMapping(hops.port, run, ipv6=(config.hop_bind or EVERY_INTERFACE) == "::")


async def _hop_bridge(hops: HopListener, config: WorkerConfig) -> BridgeHost | None:
    """Keep the hop listener registered at the group's relay under this member's certificate
    (paired groups with a relay), its calls served as hops (:meth:`HopListener.accept_bridged`)."""
    if config.tls is None or config.identity is None or not config.relay:
        return None
    if config.identity.fingerprint == config.group:  # it would take the master's registration
        log.warning("this worker holds the master's certificate: its hop listener stays off the relay")
        return None
    bridge = BridgeHost(config.relay, config.identity, list, hops.accept_bridged)
    await bridge.start()
    log.info("hop listener registering at relay %s (as %s)", config.relay, config.identity.fingerprint[:16])
    return bridge


def _tls_hint(config: WorkerConfig, e: BaseException) -> str:
    if config.tls is None:
        return ""
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return " (its certificate is not the one this machine paired with: refusing it)"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return (
            " (the master closed the TLS handshake: if this machine was removed from the group, "
            "pair again with `molink join CODE`)"
        )
    return ""


def _default_weights_dir() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("molink") / "delivered"


def _dtype_name(info: devices.DeviceInfo) -> str:
    return DTYPE_NAMES[info.dtype]


async def serve(config: WorkerConfig, control: Control | None = None, events: Events | None = None) -> None:
    # paired: hops are mutual TLS with this machine's identity (none known: no hops); plain: loopback tests
    can_hop = config.direct and (config.tls is None or config.identity is not None)
    listens = can_hop and config.hop_listen
    hops = HopListener(config.identity if config.tls is not None else None) if listens else None
    run = Run(events or Events(), hops, can_hop)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molink-stage")
    dial_task: asyncio.Task | None = None
    obey: asyncio.Task | None = None
    mapper: _HopMapping | None = None
    hop_bridge: BridgeHost | None = None
    try:
        shards: dict = {}
        info = devices.pick(config.device)
        facts = dict(
            device_facts(info),
            gflops=await asyncio.get_running_loop().run_in_executor(executor, matmul_gflops, info, 0.2),
        )
        weights = WeightCache(config.weights_dir or _default_weights_dir())
        if hops is not None:
            await _start_hops(hops, config)
            facts |= {"hop_port": hops.port, "hop_host": config.hop_host}
            mapper = _hop_mapper(hops, config, run)
            hop_bridge = await _hop_bridge(hops, config)
            facts["hop_relay"] = hop_bridge.relay if hop_bridge is not None else ""
        if config.tls is None:
            log.warning(
                "UNAUTHENTICATED plain tunnel to %s: anyone on the path can read and forge activations; "
                "for loopback tests only",
                config.master,
            )
        dial_task = asyncio.create_task(_dial(config, executor, shards, facts, weights, run))
        if control is not None:
            obey = asyncio.create_task(_obey(control, run, dial_task))
        await asyncio.wait([dial_task])  # ends by itself (no reconnect, or after a leave) or cancelled by _obey
        if not dial_task.cancelled() and (failed := dial_task.exception()) is not None:
            raise failed
        if run.leaving is not None:
            log.info("left the group")
            run.events.emit("left")
    finally:
        # stopping: never dial again, even where a tunnel's teardown swallows the cancel below
        # (Python 3.11's wait_for, worker_core.tasks); the dial loop checks this after each tunnel
        run.leaving = run.leaving or Command.STOP
        for t in (obey, dial_task):  # one cancel each: the dial's own teardown is bounded and must run
            if t is not None and not t.done():
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        if mapper is not None:
            await mapper.stop()  # bounded: a router that is gone cannot hold the exit
        if hop_bridge is not None:
            await hop_bridge.stop()
        if hops is not None:
            await hops.stop()
        executor.shutdown(wait=False, cancel_futures=True)


async def _dial(
    config: WorkerConfig, executor: ThreadPoolExecutor, shards: dict, facts: dict, weights: WeightCache, run: Run
) -> None:
    """Dial, serve, and dial again after a drop, until a leave was asked for or, with
    ``reconnect=False``, after the first tunnel.  Capped exponential backoff with jitter: the
    n-th failed attempt in a row waits a random time in ``[d/2, d]``, ``d = retry_seconds x 2^n``
    up to ``MAX_RETRY_SECONDS`` (so workers of a restarted master do not all dial at once); a
    tunnel that lasted over ``STABLE_TUNNEL`` seconds starts the count again."""
    delay = config.retry_seconds
    while True:
        t0 = time.monotonic()
        run.connected = False
        try:
            reason = await _connect_once(config, executor, shards, facts, weights, run)
            log.warning("tunnel to %s closed: %s", config.master, reason)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            log.warning("cannot reach master %s: %s%s", config.master, e, _tls_hint(config, e))
            if not run.connected:
                why = f"cannot reach the master {config.master}: {e or type(e).__name__}{_tls_hint(config, e)}"
                run.events.emit("error", message=one_line(why))
        if run.leaving is not None or not config.reconnect:
            return
        if time.monotonic() - t0 > STABLE_TUNNEL:
            delay = config.retry_seconds
        await asyncio.sleep(random.uniform(delay / 2, delay))
        delay = min(MAX_RETRY_SECONDS, delay * 2)


async def _obey(control: Control, run: Run, dial: asyncio.Task) -> None:
    """Carry out control commands.  Connected: send ``Leave`` and give the master a bounded
    time to close the tunnel (``dial`` then ends by itself); past the bound, or not connected,
    cancel ``dial``.  A ``stop`` after a ``finish`` leaves at once."""
    loop = asyncio.get_running_loop()
    deadline: asyncio.TimerHandle | None = None
    try:
        while True:
            cmd = await control.next()
            if run.leaving is Command.STOP or cmd is run.leaving:
                continue  # already leaving at least this fast
            run.leaving = cmd
            session = run.session
            if session is None:  # not connected: nobody to tell
                log.info("%s while not connected: exiting", cmd.value)
                dial.cancel()
                return
            finish = cmd is Command.FINISH
            log.info("leaving the group%s", " once the running requests end" if finish else "")
            try:
                await asyncio.wait_for(session.send(Leave(finish)), LEAVE_TIMEOUT)
            except (ConnectionError, RuntimeError, OSError, asyncio.TimeoutError) as e:
                log.warning("cannot tell the master we leave (%s): closing the tunnel", e or type(e).__name__)
                dial.cancel()
                return
            if deadline is not None:
                deadline.cancel()
            deadline = loop.call_later(LEAVE_TIMEOUT + (FINISH_TIMEOUT if finish else 0.0), _give_up, dial)
    finally:
        if deadline is not None:
            deadline.cancel()


def _give_up(dial: asyncio.Task) -> None:
    if not dial.done():
        log.warning("the master did not close the tunnel in time after our leave: closing it")
        dial.cancel()
