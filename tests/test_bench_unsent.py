"""The unsent-bytes bench's two halves (app.tools.bench.unsent) on this machine's loopback, each way
(a stage's outbox with and without few unsent bytes, the master's tunnel end): the lab run is
theirs over a shaped link; here only that they measure what they say."""

import asyncio
import socket

from harness import run

from app.tools.bench.unsent import send, serve


def test_the_sender_times_each_urgent_frame_and_each_big_frame():
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runner = await serve("127.0.0.1", port)
        try:
            ways = ("kernel", "low", "master")
            return await asyncio.gather(*(send(f"http://127.0.0.1:{port}/", way, 256, 2) for way in ways))
        finally:
            await runner.cleanup()

    kernel, low, master = run(main(), 60)
    assert kernel["unsent_low"] is False and low["unsent_low"] is True and master["unsent_low"] is True
    for way in (kernel, low, master):
        assert len(way["urgent_wait_s"]) == len(way["big_frame_s"]) == 2
        # the urgent frame is queued 0.5 s after the big one and answered at once (loopback)
        assert all(0 <= w < 5 for w in way["urgent_wait_s"])
        assert all(0 < b < 10 for b in way["big_frame_s"])  # 256 kB on loopback: before the urgent one
