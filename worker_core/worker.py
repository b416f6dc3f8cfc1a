"""The worker process: dial out to the master, announce, load the assigned layers, serve steps.

Contract
--------
``serve(config)`` runs until cancelled (or, with ``reconnect=False``, until the tunnel
closes).  Per connection: send :class:`~worker_core.wire.Hello`; then, in order, apply
``Assign`` (load the layer range, answer ``Ready``), ``Step`` (answer ``Result``, or
``Failure`` naming the step when the step does not fit this stage), and ``Free``.  Frames are
read by one task and executed in arrival order by another, so heartbeats are answered while a
step computes.  A malformed frame from the master closes the tunnel with a log line; the
worker then reconnects.  The loaded shard is kept across reconnects when the next assignment
is the same model and range (its KV caches are dropped: the master replays).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiohttp

from . import device as devices
from . import model_source
from .shaper import LinkShaper
from .shard import load_shard
from .stage import StageRunner, StepRejected
from .wire import Assign, Failure, Free, Hello, ProtocolError, Ready, Result, Step, decode, encode

log = logging.getLogger("molink.worker")

CONNECT_FRAME_LIMIT = 512 * 1024 * 1024  # bytes; frames beyond this are refused by aiohttp


@dataclass(frozen=True)
class WorkerConfig:
    master: str  # "host:port" of the master's tunnel endpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    name: str = field(default_factory=socket.gethostname)
    reconnect: bool = True  # dial again after the tunnel drops
    heartbeat: float = 5.0  # seconds between pings; a dead master is noticed within ~2x this
    retry_seconds: float = 1.0  # first reconnect delay, doubled up to 30 s
    link_delay_ms: float = 0.0  # emulated one-way delay per direction (measurement only)
    link_mbps: float | None = None  # emulated bandwidth per direction in Mbit/s (None: unlimited)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    memory_limit: int | None = None  # bytes offered to the group (None: all that is free)


class _Session:
    """State of one tunnel connection."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, executor: ThreadPoolExecutor, shards: dict, device: str, uplink: LinkShaper) -> None:
        self.ws = ws
        self.uplink = uplink
        self.executor = executor
        self.shards = shards  # (model, start, end) -> Shard, kept across reconnects
        self.device = device
        self.runner: StageRunner | None = None
        self.epoch = -1

    async def send(self, msg: object) -> None:
        await self.uplink.put(encode(msg))  # type: ignore[arg-type]

    async def handle(self, msg: object, arrived: float) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(msg, Assign):
            t0 = time.perf_counter()
            key = (msg.model, msg.layer_start, msg.layer_end)
            shard = self.shards.get(key)
            if shard is None:
                self.runner = None
                self.shards.clear()  # one shard at a time: free the old range first
                try:
                    info = devices.pick(self.device)
                    folder = await loop.run_in_executor(self.executor, model_source.resolve, msg.model)
                    shard = await loop.run_in_executor(
                        self.executor, load_shard, folder, msg.layer_start, msg.layer_end, info.device, info.dtype
                    )
                except Exception as e:  # tell the master why, instead of leaving it waiting
                    log.exception("cannot load layers [%d, %d)", msg.layer_start, msg.layer_end)
                    await self.send(Failure(f"cannot load layers [{msg.layer_start}, {msg.layer_end}): {type(e).__name__}: {e}"[:4000]))
                    return
                self.shards[key] = shard
            self.runner = StageRunner(shard, msg.kv_tokens, msg.max_batch_tokens)
            self.epoch = msg.epoch
            await self.send(Ready(msg.epoch, shard.hidden_size, shard.vocab_size, time.perf_counter() - t0, shard.weight_bytes))
            log.info("serving layers [%d, %d) of %d (epoch %d)", msg.layer_start, msg.layer_end, msg.num_layers, msg.epoch)
        elif isinstance(msg, Step):
            if self.runner is None or msg.epoch != self.epoch:
                await self.send(Failure(f"step of epoch {msg.epoch} but this worker serves epoch {self.epoch}", msg.step_id))
                return
            runner = self.runner
            try:
                out = await loop.run_in_executor(self.executor, runner.run, msg.segments, msg.tensor, msg.topk)
            except StepRejected as e:
                await self.send(Failure(str(e), msg.step_id))
                return
            except Exception as e:  # compute failure (e.g. out of memory): report, keep serving
                log.exception("step %d failed", msg.step_id)
                await self.send(Failure(f"{type(e).__name__}: {e}", msg.step_id))
                return
            await self.send(Result(msg.step_id, msg.epoch, runner.last_compute_seconds, time.perf_counter() - arrived, out))
        elif isinstance(msg, Free):
            if self.runner is not None:
                self.runner.free(msg.request_ids)
        elif isinstance(msg, Failure):
            log.warning("master reports: %s", msg.message)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from the master")


async def _connect_once(config: WorkerConfig, executor: ThreadPoolExecutor, shards: dict, gflops: float) -> None:
    info = devices.pick(config.device)
    offered = info.free_memory if config.memory_limit is None else min(info.free_memory, config.memory_limit)
    url = f"ws://{config.master}/v1/tunnel"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, max_msg_size=CONNECT_FRAME_LIMIT, compress=0, heartbeat=config.heartbeat) as ws:
            log.info("connected to %s as %r on %s (%s)", config.master, config.name, info.device, info.name)
            delay = config.link_delay_ms / 1000.0
            rate = config.link_mbps * 1e6 / 8 if config.link_mbps else None
            uplink = LinkShaper(delay, rate, ws.send_bytes)
            session = _Session(ws, executor, shards, config.device, uplink)
            await session.send(
                Hello(config.name[:128], str(info.device), info.name[:256], info.total_memory, offered, _dtype_name(info), gflops)
            )
            queue: asyncio.Queue = asyncio.Queue()

            async def arrive(data: bytes) -> None:
                queue.put_nowait((data, time.perf_counter()))

            downlink = LinkShaper(delay, rate, arrive)

            async def execute() -> None:
                while True:
                    data, arrived = await queue.get()
                    try:
                        msg = decode(data)
                        await session.handle(msg, arrived)
                    except ProtocolError as e:
                        log.error("protocol error from the master, closing the tunnel: %s", e)
                        await ws.close(code=1002, message=b"protocol error")
                        return

            runner_task = asyncio.create_task(execute())
            try:
                async for frame in ws:
                    if frame.type != aiohttp.WSMsgType.BINARY:
                        if frame.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                            break
                        raise ProtocolError(f"unexpected {frame.type.name} frame")
                    await downlink.put(frame.data)
                if runner_task.done() and not runner_task.cancelled() and runner_task.exception():
                    raise runner_task.exception()  # type: ignore[misc]
            except ProtocolError as e:
                log.error("protocol error from the master, closing the tunnel: %s", e)
                await ws.close(code=1002, message=str(e)[:100].encode())
            finally:
                runner_task.cancel()
                uplink.close()
                downlink.close()


def _dtype_name(info: devices.DeviceInfo) -> str:
    from .wire import DTYPE_NAMES

    return DTYPE_NAMES[info.dtype]


async def serve(config: WorkerConfig) -> None:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molink-stage")
    shards: dict = {}
    from .probe import matmul_gflops

    gflops = await asyncio.get_running_loop().run_in_executor(executor, matmul_gflops, devices.pick(config.device), 0.2)
    delay = config.retry_seconds
    try:
        while True:
            t0 = time.monotonic()
            try:
                await _connect_once(config, executor, shards, gflops)
                log.warning("tunnel to %s closed", config.master)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                log.warning("cannot reach master %s: %s", config.master, e)
            if not config.reconnect:
                return
            if time.monotonic() - t0 > 10:
                delay = config.retry_seconds
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
