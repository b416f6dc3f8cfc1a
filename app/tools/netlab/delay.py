"""A transparent TCP proxy that adds a fixed one-way delay in each direction (the lab's routers).

Contract
--------
Run inside a router's network namespace (``python -m app.tools.netlab.delay --port P
--delay-ms D``).  The router's nftables ``redirect`` sends the TCP connections it forwards out
of its home to ``P`` on itself; for each one the proxy reads the original destination
(``SO_ORIGINAL_DST``), dials it from the router, and copies bytes both ways, each chunk held
``D`` milliseconds before it is written (order kept, reads never wait on the delay).  So any TCP
program crossing the router sees ``2 D`` more round trip, since this kernel has no netem.
Bandwidth is not limited here (the lab shapes links in the kernel with ``tbf``).  Each copy
buffers at most ``MAX_BUFFERED`` bytes before it stops reading (back pressure).  The process
runs until killed (SIGTERM ends it cleanly); ``/proc``-free, stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MAX_BUFFERED = 4 * 1024 * 1024  # bytes in flight per direction before reading pauses
DIAL_TIMEOUT = 10.0  # seconds


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """(address, port) the client dialled before the router redirected it here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader -> writer, each chunk written ``delay`` seconds after it was read."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    room = asyncio.Semaphore(max(1, MAX_BUFFERED // 65536))

    async def pump() -> None:
        while True:
            await room.acquire()
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                return

    async def drain() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            room.release()
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(pump())
    try:
        await drain()
    finally:
        reading.cancel()


async def _handle(delay: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    try:
        host, port = original_destination(sock)
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        writer.close()
        return
    try:
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay))
    except (OSError, ConnectionError):
        pass
    finally:
        for w in (writer, up_writer):
            w.close()


async def serve(port: int, delay_ms: float) -> None:
    delay = delay_ms / 1000.0
    server = await asyncio.start_server(lambda r, w: _handle(delay, r, w), "0.0.0.0", port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"delay proxy on :{port}, {delay_ms} ms each way", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.port, args.delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
