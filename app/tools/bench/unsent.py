"""A decode frame behind a prefill frame's pieces on a shaped link, with and without few unsent bytes.

Contract
--------
``python -m app.tools.bench.unsent [--mbps 20] [--frame-kb 2048] [--repeats 5] [--out F]`` (root)
builds the ``upnp`` topology with every internet link shaped (tbf, both ways; no delay proxy: its
TCP would end at the router, and the sender's socket would never meet the shaped link) and runs a
WebSocket receiver on ``pub``.  From host ``b`` (home b, behind its router's NAT) a sender opens one
WebSocket per way and ``--repeats`` times queues a ``Result`` frame of ``--frame-kb`` KiB in a
:class:`~worker_core.outbox.Outbox` that sends it as ``Part`` frames
(:func:`~worker_core.pieces.split`: a stage's prefill output), waits ``AFTER`` seconds, queues a
small ``Result`` as urgent (a decode step's) and times until the receiver (joining the pieces,
:class:`~worker_core.pieces.Joiner`) has answered it (the answer crosses the idle way back: a few
ms).  The ways: ``kernel`` (the socket as the OS makes it) and ``low``
(:func:`worker_core.unsent.keep_unsent_low`), and ``master``: the master's own way of sending over
a worker's tunnel (:class:`~master_core.link.WorkerLink`, few unsent bytes too), the big frame a
relayed prefill ``Step`` (non-passing, in pieces), the urgent one a decode ``Step`` that passes
(:func:`worker_core.pieces.passes`).  It reports per way the urgent frame's waits and the
big frame's seconds, as JSON on stdout (and in ``--out``).  Everything runs in the lab, which is
removed at the end.  ``--role receive|send`` are its two halves, run inside the lab.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import torch
from aiohttp import web

from app.tools.netlab.joinbench import _line, _stop
from app.tools.netlab.lab import Lab
from master_core.link import LinkState, WorkerLink
from worker_core.outbox import Outbox
from worker_core.pieces import Joiner, split
from worker_core.unsent import keep_unsent_low
from worker_core.wire import PART_BYTES, Hello, Result, Segment, Step, encode

ROOT = Path(__file__).resolve().parents[3]
PORT = 7790
AFTER = 0.5  # seconds between queueing the big frame and the urgent one: the pieces are on their way
BIG, URGENT = 1, 2  # the step ids of the big frame and of the urgent one
WAYS = ("kernel", "low", "master")


async def serve(host: str, port: int) -> web.AppRunner:
    """The receiver: joins the pieces as the master does (:class:`~worker_core.pieces.Joiner`) and
    answers each whole frame at once with its step id."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        joiner = Joiner()
        async for msg in ws:
            if isinstance(whole := joiner.feed(msg.data, 1 << 30), (Result, Step)):
                await ws.send_str(str(whole.step_id))
        return ws

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def receive(port: int) -> None:
    await serve("0.0.0.0", port)  # inside the lab: its addresses exist only there
    print("listening", flush=True)
    await asyncio.Event().wait()


async def send(url: str, way: str, frame_kb: int, repeats: int) -> dict:
    """One way's repeats: the urgent frame's waits (s) and the big frame's seconds."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=1 << 20) as ws:
        set_low = keep_unsent_low(ws) if way != "kernel" else False
        answers: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        outbox: Outbox[bytes] = Outbox(ws.send_bytes, split)  # as a stage's outbox: in pieces
        sending: set[asyncio.Future] = set()
        if way == "master":  # the master's end of a tunnel: its own order, in pieces (master_core.link)
            link = WorkerLink(ws, Hello("lab", "cpu", "cpu", 1, 1, "float32"), "pub", 1 << 30)  # type: ignore[arg-type]
            link.move(LinkState.READY)
            rows = frame_kb * 256 // 576  # a relayed prefill step: float32 hidden states of 576 a token
            big_step = Step(BIG, 1, (Segment(1, 0, rows, False),), torch.zeros(rows, 576))
            decode_step = Step(URGENT, 1, (Segment(2, 30, 1, True),), torch.zeros(1, 576))

            def put(urgent: bool) -> None:
                sending.add(asyncio.ensure_future(link._send(decode_step if urgent else big_step)))  # noqa: SLF001

        else:
            big = encode(Result(BIG, 1, 0.0, 0.0, torch.zeros(frame_kb * 256)))  # float32: frame_kb KiB
            small = encode(Result(URGENT, 1, 0.0, 0.0, torch.zeros(4)))  # a decode step's result

            def put(urgent: bool) -> None:
                outbox.put(small if urgent else big, urgent)

        async def read() -> None:
            async for msg in ws:
                answers.put_nowait((int(msg.data), time.monotonic()))

        reader = asyncio.ensure_future(read())
        waits, whole = [], []
        try:
            for _ in range(repeats):
                t0 = time.monotonic()
                put(False)
                await asyncio.sleep(AFTER)
                t1 = time.monotonic()
                put(True)
                got: dict[int, float] = {}
                while len(got) < 2:
                    step, at = await asyncio.wait_for(answers.get(), 120)
                    got[step] = at
                waits.append(round(got[URGENT] - t1, 4))
                whole.append(round(got[BIG] - t0, 4))  # as the waits: 3 decimals made a fast loopback 0
        finally:
            reader.cancel()
            await outbox.close()
            await asyncio.gather(*sending, return_exceptions=True)
            if way == "master":
                link.close_with("measured")
                await link.wait_closed()
        return {"unsent_low": set_low, "urgent_wait_s": waits, "big_frame_s": whole}


def measure(mbps: float, frame_kb: int, repeats: int) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    me = [sys.executable, "-m", "app.tools.bench.unsent"]
    with Lab.up("unsent", "upnp", mbps=mbps) as lab:
        receiver = lab.spawn("pub", [*me, "--role", "receive"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, cwd=str(ROOT))  # fmt: skip
        try:
            _line(receiver, "listening", 60)
            url = f"http://{lab.address('pub')}:{PORT}/"
            ways = {}
            for way in WAYS:
                argv = [*me, "--role", "send", "--url", url, "--way", way, "--frame-kb", str(frame_kb),
                        "--repeats", str(repeats)]  # fmt: skip
                done = subprocess.run(lab.argv("b", argv), capture_output=True, text=True, env=env, cwd=str(ROOT),
                                      timeout=120 + repeats * 60)  # fmt: skip
                if done.returncode != 0:
                    raise RuntimeError(f"the sender failed: {done.stderr.strip()[-400:]}")
                ways[way] = json.loads(done.stdout)
        finally:
            _stop([receiver])
    for w in ways.values():
        w["urgent_wait_median_s"] = round(statistics.median(w["urgent_wait_s"]), 4)
    return {
        "command": " ".join(["python -m app.tools.bench.unsent", *sys.argv[1:]]),
        "config": {"mbps": mbps, "frame_kb": frame_kb, "repeats": repeats, "piece_bytes": PART_BYTES, "after_s": AFTER},
        "ways": ways,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.tools.bench.unsent", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--mbps", type=float, default=20.0)
    ap.add_argument("--frame-kb", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--role", choices=("receive", "send"))
    ap.add_argument("--url")
    ap.add_argument("--way", choices=WAYS)
    args = ap.parse_args(argv)
    if args.role == "receive":
        asyncio.run(receive(PORT))
        return 0
    if args.role == "send":
        print(json.dumps(asyncio.run(send(args.url, args.way, args.frame_kb, args.repeats))))
        return 0
    report = measure(args.mbps, args.frame_kb, args.repeats)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
