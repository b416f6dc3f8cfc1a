"""A healthy worker on a slow link is never dropped: liveness counts bytes, not complete frames.

A fake worker answers a step with a Result frame that takes about 3.5 s on its emulated uplink
(a loopback TCP proxy whose worker -> master direction goes through
:class:`worker_core.shaper.LinkShaper` in 16 KiB pieces, so bytes trickle as on a real slow
link and the worker's pongs queue behind them).  That is longer than ``SILENT_LIMIT``: judged
by complete frames the master would call it silent and drop it (checked too, with the byte
hook left out, so the test can fail); judged by bytes it is heard all the while.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
import torch
from aiohttp import WSMsgType, web
from harness import run

from master_core import liveness as L
from master_core.link import LinkGone, LinkState, WorkerLink
from master_core.metering import on_bytes
from worker_core.shaper import LinkShaper
from worker_core.wire import Hello, Result, Segment, Step, decode, encode

RATE = 100_000  # bytes/s of the worker's uplink
PIECE = 16 * 1024  # bytes the proxy hands to the shaper at a time
HIDDEN = 1000
ROWS = 88  # x 1000 x 4 B = 352 kB: about 3.5 s at RATE
MAX_FRAME = 1 << 24


async def _shaped_proxy(target_port: int) -> tuple[asyncio.Server, list[asyncio.Task]]:
    """127.0.0.1 proxy to ``target_port``: client -> target shaped to ``RATE``, back unshaped."""
    tasks: list[asyncio.Task] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def deliver(data: bytes) -> None:
            up_writer.write(data)
            await up_writer.drain()

        shaper = LinkShaper(0.0, RATE, deliver)

        async def up() -> None:
            while data := await reader.read(PIECE):
                await shaper.put(data)

        async def down() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        pair = [asyncio.create_task(up()), asyncio.create_task(down())]
        tasks.extend(pair)
        try:
            await asyncio.wait(pair, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in pair:
                t.cancel()
            shaper.close()
            up_writer.close()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, tasks


async def _slow_worker(port: int, done: asyncio.Event) -> None:
    """Say Hello, answer the one Step with a large Result, keep answering pings (aiohttp's
    autoping: each pong goes out behind the bytes already queued)."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://127.0.0.1:{port}/t", max_msg_size=MAX_FRAME, compress=0) as ws,
    ):
        await ws.send_bytes(encode(Hello("slow", "cpu", "cpu", 10**10, 10**10, "float32")))
        async for frame in ws:
            if frame.type is not WSMsgType.BINARY:
                break
            step = decode(frame.data, MAX_FRAME)
            if isinstance(step, Step):
                out = torch.zeros(ROWS, HIDDEN)
                await ws.send_bytes(encode(Result(step.step_id, step.epoch, 0.01, 0.01, out)))
            if done.is_set():
                break


async def _scenario(metered: bool) -> tuple[str, object]:
    """(the link's state after the step, the step's result or the error it raised)"""
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def tunnel(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, compress=False, heartbeat=None, autoping=False)
        await ws.prepare(request)
        link: WorkerLink | None = None
        if metered:  # as master_core.server does
            assert on_bytes(request, lambda: link.heard_bytes() if link is not None else None)
        hello = decode((await ws.receive(timeout=10)).data, MAX_FRAME)
        assert isinstance(hello, Hello)
        link = WorkerLink(ws, hello, "127.0.0.1", MAX_FRAME)
        link.move(LinkState.READY)
        got.set_result(link)
        try:
            await link.run_reader()
        finally:
            link.close_with(link.gone_reason or "tunnel closed")
            await link.wait_closed()
        return ws

    app = web.Application()
    app.router.add_get("/t", tunnel)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    proxy, proxy_tasks = await _shaped_proxy(port)
    done = asyncio.Event()
    worker = asyncio.create_task(_slow_worker(proxy.sockets[0].getsockname()[1], done))
    try:
        link: WorkerLink = await asyncio.wait_for(got, 10)
        step = Step(1, 0, (Segment(5, 0, ROWS, False),), torch.zeros(ROWS, dtype=torch.int64))
        try:
            _, result = await asyncio.wait_for(link.call(step), 20)
            outcome: object = result
        except LinkGone as e:
            outcome = e
        return link.state.value, outcome
    finally:
        done.set()
        worker.cancel()
        with contextlib.suppress(BaseException):
            await worker
        proxy.close()
        for t in proxy_tasks:
            t.cancel()
        await runner.cleanup()


@pytest.mark.parametrize("metered", [True, False])
def test_a_frame_longer_than_the_silent_limit_on_a_slow_link_does_not_drop_a_healthy_worker(metered: bool):
    assert ROWS * HIDDEN * 4 / RATE > L.SILENT_LIMIT + 1.0  # the frame really outlasts the limit
    state, outcome = run(_scenario(metered), 60)
    if metered:
        assert state == "ready"
        assert isinstance(outcome, Result) and tuple(outcome.tensor.shape) == (ROWS, HIDDEN)
    else:  # judged by complete frames only, the same healthy worker is dropped: what the hook prevents
        assert isinstance(outcome, LinkGone) and "silent for" in str(outcome)
