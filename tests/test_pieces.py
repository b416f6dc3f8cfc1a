"""Longer frames in pieces (worker_core.pieces): cut and joined exactly, whole frames between the
pieces, bad pieces refused; and an outbox that lets a decode frame go between a long frame's
pieces on a slow link, without mixing two frames' pieces."""

from __future__ import annotations

import asyncio

import pytest
import torch
from harness import run

from worker_core import wire
from worker_core.outbox import Outbox
from worker_core.pieces import Joiner, split
from worker_core.shaper import LinkShaper
from worker_core.wire import Free, Part, ProtocolError, Result, Segment, Step, decode, encode


def _long_step(tokens: int = 107, hidden: int = 576) -> Step:
    return Step(3, 1, (Segment(1, 0, tokens, False),), torch.randn(tokens, hidden))


def test_a_long_frame_is_cut_into_pieces_and_joined_exactly_with_whole_frames_between():
    step = _long_step()
    frame = encode(step)
    pieces = split(frame)
    assert len(pieces) == -(-len(frame) // wire.PART_BYTES) > 1
    parts = [decode(p) for p in pieces]
    assert all(isinstance(p, Part) for p in parts)
    big = 1 << 28
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(len(p) <= wire.PART_BYTES + 64 for p in pieces)  # a piece's header is small
    short = encode(Free((5,)))
    assert split(short) == [short]  # a short frame goes whole
    joiner = Joiner()
    got = []
    for i, p in enumerate(pieces):
        got.append(joiner.feed(p, big))
        if i == 2:  # a decode step's frame goes between the pieces
            assert joiner.pending > 0
            assert joiner.feed(short, big) == Free((5,))
    assert got[:-1] == [None] * (len(parts) - 1)
    whole = got[-1]
    assert isinstance(whole, Step) and whole == step and torch.equal(whole.tensor, step.tensor)
    assert joiner.pending == 0
    again = Result(3, 1, 0.5, 0.6, torch.randn(40, 576))  # the joiner goes on with the next frame
    out = [joiner.feed(p, big) for p in split(encode(again))]
    assert out[-1] == again


def test_bad_pieces_are_refused():
    frame = encode(_long_step())
    pieces = split(frame)
    with pytest.raises(ProtocolError, match="exceeds the limit"):  # the frame in pieces is too long
        small = Joiner()
        for p in pieces:
            small.feed(p, len(frame) - 1)
    nested = split(b"".join(split(frame)[:2]), 4096)  # pieces holding pieces
    with pytest.raises(ProtocolError):
        joiner = Joiner()
        for p in nested:
            joiner.feed(p, 1 << 28)
    torn = Joiner()  # a frame missing a middle piece does not decode
    with pytest.raises(ProtocolError):
        for p in pieces[:1] + pieces[2:]:
            torn.feed(p, 1 << 28)


def test_a_decode_frame_goes_between_a_long_frames_pieces_on_a_slow_link():
    """On a 1 MB/s link two 200 kB prefill outputs are queued in pieces of 16 kB; a decode
    output put while the first is on the link leaves after the piece on the link (about 16 ms),
    not after the frame (0.2 s); each frame's pieces arrive together, in order."""

    async def main() -> tuple[list[object], dict[str, float]]:
        loop = asyncio.get_running_loop()
        joiner = Joiner()
        got: list[object] = []
        arrived: dict[str, float] = {}

        async def deliver(frame: bytes) -> None:
            msg = joiner.feed(frame, 1 << 28)
            if msg is not None:
                got.append(msg)
                arrived[type(msg).__name__ + str(getattr(msg, "step_id", ""))] = loop.time()

        shaper = LinkShaper(0.0, 1_000_000, deliver)

        async def ship(frame: bytes) -> None:
            await shaper.put(frame)
            await shaper.drained()

        box: Outbox[bytes] = Outbox(ship, split)
        t0 = loop.time()
        for i in (1, 2):
            box.put(encode(Result(i, 1, 0.0, 0.0, torch.zeros(50_000))))  # 200 kB
        await asyncio.sleep(0.05)  # the first frame's pieces are on their way
        box.put(encode(Result(9, 1, 0.0, 0.0, torch.zeros(4))), urgent=True)
        await box.flush(5)
        await asyncio.sleep(0.05)
        assert not await box.close()
        shaper.close()
        return got, {k: v - t0 for k, v in arrived.items()}

    got, at = run(main(), 20)
    assert [m.step_id for m in got] == [9, 1, 2]  # type: ignore[attr-defined]
    assert at["Result9"] < 0.05 + 0.04  # one piece's wait, not the rest of the frame's
    assert at["Result1"] > 0.2 and at["Result2"] > 0.4


def test_a_closed_outbox_returns_the_pieces_it_never_sent_in_order():
    async def main() -> tuple[list[bytes], list[bytes]]:
        sent: list[bytes] = []
        gate = asyncio.Event()

        async def ship(item: bytes) -> None:
            sent.append(item)
            await gate.wait()  # the link stalls after the first piece

        box: Outbox[bytes] = Outbox(ship, lambda b: [b[i : i + 2] for i in range(0, len(b), 2)])
        box.put(b"aabbcc")
        box.put(b"dd")
        await asyncio.sleep(0.05)
        return sent, await box.close()

    sent, left = run(main(), 10)
    assert sent == [b"aa"] and left == [b"bb", b"cc", b"dd"]


def test_the_masters_link_sends_a_decode_step_between_a_relayed_steps_pieces():
    """The master relays a prefill step's hidden states (about 250 kB) to a stage over a slow
    tunnel: a decode step sent meanwhile goes between its pieces, a second long step waits for
    the first whole (pieces never mix), and a caller that gives up mid-frame does not cut it
    short (the worker joins every frame exactly)."""
    from master_core.link import LinkState, WorkerLink
    from worker_core.wire import Hello

    class SlowTunnel:  # a WebSocket whose link takes 2 ms per frame
        closed = True  # nothing for close_with to close

        def __init__(self) -> None:
            self.frames: list[bytes] = []

        async def send_bytes(self, frame: bytes) -> None:
            self.frames.append(frame)
            await asyncio.sleep(0.002)

    async def main() -> tuple[list[bytes], list[Step]]:
        ws = SlowTunnel()
        link = WorkerLink(ws, Hello("w", "cpu", "cpu", 10**10, 10**10, "float32"), "127.0.0.1", 1 << 28)  # type: ignore[arg-type]
        link.move(LinkState.READY)
        first, second = _long_step(), Step(4, 1, (Segment(2, 0, 107, False),), torch.randn(107, 576))
        decode_step = Step(5, 1, (Segment(7, 30, 1, True), Segment(8, 12, 1, True)), torch.randn(2, 576))
        calls = [asyncio.create_task(link.call(first))]
        await asyncio.sleep(0.02)  # a few of its pieces are out
        calls.append(asyncio.create_task(link.call(second)))
        await asyncio.sleep(0)
        calls.append(asyncio.create_task(link.call(decode_step)))
        await asyncio.sleep(0.005)
        calls[0].cancel()  # its caller gives up: the frame still goes out whole
        for _ in range(300):
            if link.bytes_sent >= sum(len(encode(s)) for s in (first, second, decode_step)):
                break
            await asyncio.sleep(0.01)
        for c in calls:
            c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        link.close_with("test over")
        await link.wait_closed()
        return ws.frames, [first, second, decode_step]

    frames, (first, second, decode_step) = run(main(), 20)
    joiner = Joiner()
    got = [(i, m) for i, f in enumerate(frames) if (m := joiner.feed(f, 1 << 28)) is not None]
    assert [m.step_id for _, m in got] == [5, 3, 4]  # type: ignore[attr-defined]
    assert got[0][0] < 16  # the decode step waited one piece, not the first step's 16 pieces
    for want, (_, m) in zip((decode_step, first, second), got):
        assert m == want and torch.equal(m.tensor, want.tensor)  # type: ignore[attr-defined]


def test_few_unsent_bytes_are_two_pieces():
    """worker_core.unsent writes its bound as a number (the relay imports no torch, so not the
    wire): two pieces, so the kernel always has the next one to send."""
    from worker_core.unsent import UNSENT_BYTES

    assert UNSENT_BYTES == 2 * wire.PART_BYTES
