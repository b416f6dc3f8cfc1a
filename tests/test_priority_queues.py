"""Decode frames never wait behind prefill bytes: the worker's inbox and its outboxes.

Fabricated steps only: which message leaves first, and that nothing whose order matters
(a prompt's chunks, a Free, an Assign) is ever overtaken.
"""

from __future__ import annotations

import asyncio
import contextlib

import torch
from harness import run

from worker_core.inbox import Inbox, urgent
from worker_core.outbox import Outbox
from worker_core.shaper import LinkShaper
from worker_core.wire import Free, Segment, Step


def _step(step_id: int, *segs: tuple[int, int, int]) -> Step:
    segments = tuple(Segment(rid, start, length, True) for rid, start, length in segs)
    total = sum(s.length for s in segments)
    return Step(step_id, 1, segments, torch.zeros(total, dtype=torch.int64))


def test_a_decode_step_is_urgent_only_when_it_continues_a_cache_held_exactly_up_to_it():
    held = {7: 40, 8: 12}.get

    def h(rid: int) -> int:
        return held(rid) or 0

    assert urgent(_step(1, (7, 40, 1), (8, 12, 1)), h)  # two decodes continuing their caches
    assert not urgent(_step(1, (7, 40, 1), (9, 0, 64)), h)  # carries a prefill chunk: keeps its order
    assert not urgent(_step(1, (7, 41, 1)), h)  # a token ahead of the cache: something it needs is queued
    assert not urgent(_step(1, (9, 0, 1)), h)  # a one-token prompt starts a cache: in order
    assert not urgent(_step(1, (7, 40, 1)), None)  # no stage served yet
    assert not urgent(Free((7,)), h)


def test_the_inbox_serves_decode_steps_first_and_keeps_everything_else_in_arrival_order():
    async def main() -> list[tuple[int | str, bool]]:
        held = {1: 10, 2: 20}
        inbox = Inbox(lambda: lambda rid: held.get(rid, 0), clock=lambda: 0.0)  # nobody waits long here
        inbox.put_nowait(_step(101, (3, 0, 512)), 0.0)  # a prompt's first chunk
        inbox.put_nowait(_step(102, (3, 512, 300)), 0.0)  # its second: must follow the first
        inbox.put_nowait(Free((4,)), 0.0)
        inbox.put_nowait(_step(103, (1, 10, 1), (2, 20, 1)), 0.0)  # decodes: go first
        inbox.put_nowait(_step(104, (5, 0, 200), (1, 10, 1)), 0.0)  # mixed: in order
        inbox.put_nowait(_step(105, (2, 20, 1)), 0.0)
        out = []
        while inbox.qsize():
            msg, _, hurry = await inbox.get()
            out.append((msg.step_id if isinstance(msg, Step) else "free", hurry))
        assert inbox.overtakes == 2
        return out

    assert run(main(), 10) == [(103, True), (105, True), (101, False), (102, False), ("free", False), (104, False)]


def test_a_prompts_chunk_waits_behind_decode_steps_at_most_its_patience():
    """Decode steps that keep coming (streams looping back on a busy stage) must not hold a
    prompt's chunk back for ever: once it has waited ``patience``, it goes first."""

    async def main() -> list[int]:
        held = {1: 10}
        now = [0.0]
        inbox = Inbox(lambda: lambda rid: held.get(rid, 0), clock=lambda: now[0], patience=0.5)
        inbox.put_nowait(_step(201, (3, 0, 107)), 0.0)  # a prompt's chunk
        inbox.put_nowait(_step(202, (3, 107, 107)), 0.1)  # its next one
        out = []
        for t in (0.0, 0.2, 0.4, 0.6, 0.7):  # a decode step arrives, the stage takes the next message
            now[0] = t
            inbox.put_nowait(_step(300 + int(t * 10), (1, 10, 1)), t)
            msg, _, _ = await inbox.get()
            assert isinstance(msg, Step)
            out.append(msg.step_id)
        assert inbox.impatient == 2
        return out

    # decode steps first until the chunk has waited 0.5 s; then both chunks (in their order),
    # the second having waited 0.6 s by then
    assert run(main(), 10) == [300, 302, 304, 201, 202]


def test_a_pause_serves_the_decode_steps_queued_then_not_those_that_keep_arriving():
    async def main() -> tuple[list[int], int]:
        held = {1: 10}
        inbox = Inbox(lambda: lambda rid: held.get(rid, 0))
        for i in range(3):
            inbox.put_nowait(_step(400 + i, (1, 10, 1)), 0.0)
        served: list[int] = []

        async def handle(msg: object, arrived: float, hurry: bool) -> None:
            assert isinstance(msg, Step) and hurry
            served.append(msg.step_id)
            inbox.put_nowait(_step(500 + len(served), (1, 10, 1)), 0.0)  # another one arrives meanwhile

        n = await asyncio.wait_for(inbox.serve_urgent(handle), 5)
        return served, n

    served, n = run(main(), 10)
    assert served == [400, 401, 402] and n == 3  # the paused step goes on; 501-503 wait for the next pause


def test_an_inbox_get_waits_for_a_message():
    async def main() -> tuple[object, float, bool]:
        inbox = Inbox(lambda: None)
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0.05)
        assert not getter.done()
        inbox.put_nowait("x", 1.5)
        return await asyncio.wait_for(getter, 1)

    assert run(main(), 10) == ("x", 1.5, False)


def test_an_outbox_never_blocks_its_caller_and_sends_urgent_items_before_queued_ones():
    """On a 1 MB/s link, three 200 kB prefill outputs are queued; a decode output put after them
    leaves after the first (already on the link), not after all three: it waits about 0.2 s,
    not 0.6 s.  The caller's put returns at once (the stage goes on computing)."""

    async def main() -> tuple[list[str], dict[str, float], float]:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        arrived: dict[str, float] = {}

        async def deliver(frame: bytes) -> None:
            name = frame[:8].decode().strip()
            order.append(name)
            arrived[name] = loop.time()

        shaper = LinkShaper(0.0, 1_000_000, deliver)

        async def ship(frame: bytes) -> None:
            await shaper.put(frame)
            await shaper.drained()

        box: Outbox[bytes] = Outbox(ship)
        t0 = loop.time()
        for i in range(3):
            box.put(f"prefill{i}".encode().ljust(200_000, b"."))
        await asyncio.sleep(0.01)  # the first is on the link now
        box.put(b"decode".ljust(8, b" ") + b"x" * 100, urgent=True)
        put_took = loop.time() - t0
        await box.flush(5)
        await asyncio.sleep(0.05)
        left = await box.close()
        shaper.close()
        assert not left
        return order, {k: v - t0 for k, v in arrived.items()}, put_took

    order, at, put_took = run(main(), 20)
    assert put_took < 0.05
    assert order == ["prefill0", "decode", "prefill1", "prefill2"]
    assert at["decode"] < 0.35 and at["prefill2"] > 0.55


def test_a_closed_outbox_returns_what_it_never_sent_urgent_first():
    async def main() -> list[str]:
        gate = asyncio.Event()

        async def ship(item: str) -> None:
            await gate.wait()  # the link never drains

        box: Outbox[str] = Outbox(ship)
        box.put("a")
        await asyncio.sleep(0.05)  # "a" is being shipped (lost with the link), the rest wait
        box.put("b")
        box.put("u", urgent=True)
        return await box.close()

    assert run(main(), 10) == ["u", "b"]


def test_an_outbox_closes_even_where_its_ship_swallowed_the_cancellation_and_never_swallows_its_callers():
    """Python 3.11's ``wait_for`` can swallow a cancellation that lands as its inner await ends
    (:mod:`worker_core.tasks`): a ship that does so must not keep the outbox's task alive (its
    ``close`` hung the worker's ``Assign`` for good, the loop then waiting for more), nor take
    another item; and the caller's own cancellation, arriving while it closes, is not lost."""

    async def main() -> tuple[list[str], bool]:
        async def ship(item: str) -> None:
            with contextlib.suppress(asyncio.CancelledError):  # swallowed, as wait_for may
                await asyncio.sleep(30)

        box: Outbox[str] = Outbox(ship)
        box.put("a")
        await asyncio.sleep(0.05)  # "a" is being shipped
        box.put("b")
        left = await asyncio.wait_for(box.close(), 10)
        again: Outbox[str] = Outbox(ship)
        again.put("x")
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(again.close())
        await asyncio.sleep(0)
        closing.cancel()  # the caller is cancelled while the outbox ends
        try:
            await asyncio.wait_for(closing, 10)
        except asyncio.CancelledError:
            return left, True
        return left, False

    left, cancelled = run(main(), 30)
    assert left == ["b"]  # never taken after the close: the caller may send it another way
    assert cancelled, "the caller's cancellation was swallowed while the outbox closed"
