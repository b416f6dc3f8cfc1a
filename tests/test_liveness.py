"""The master's liveness rule for a worker tunnel (``the rule of master_core.liveness``), checked on its clock.

The rule itself decides when a frozen, hung or cut-off worker is dropped; the chaos tests
(tests/test_chaos.py) show it end to end with real processes.  Here each clause is pinned to
its constants, both sides of each bound, so a change of rule shows as a failing test.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from harness import run

from master_core import link as L
from master_core import liveness as LV
from master_core.costs import StageCost
from master_core.link import LinkState, WorkerLink, _Pending
from worker_core.wire import Failure, Hello, Result


class _Ws:
    closed = False

    async def close(self, **_: object) -> None:  # the tunnel closes later: not ``closed`` yet
        pass


def _link() -> WorkerLink:
    hello = Hello("w", "cpu", "cpu", 10**10, 10**10, "float32")
    return WorkerLink(_Ws(), hello, "127.0.0.1", 1 << 20)  # type: ignore[arg-type]  # _Ws fakes the websocket


def test_a_link_is_hung_after_silent_limit_seconds_or_the_longer_limit_while_loading():
    async def main() -> None:
        link = _link()
        t = link.alive.heard_at
        assert link.hung(t + LV.SILENT_LIMIT - 0.1) is None  # standing by: the short limit
        why = link.hung(t + LV.SILENT_LIMIT + 0.1)
        assert why is not None and why.startswith("silent for")
        link._ready_waiter = asyncio.get_running_loop().create_future()  # an Assign being loaded
        assert link.hung(t + LV.SILENT_LIMIT + 0.1) is None
        assert link.hung(t + LV.LOADING_SILENT_LIMIT + 0.1) is not None
        link._ready_waiter.set_result(None)
        link.move(LinkState.READY)
        assert link.hung(t + LV.SILENT_LIMIT + 0.1) is not None

    run(main(), 10)


def test_a_step_deadline_scales_with_the_measured_cost_and_has_a_floor():
    link = _link()
    assert link.step_deadline(64, 10_000) == L.UNMEASURED_STEP_DEADLINE
    for tokens, seconds in ((1, 0.01), (64, 0.64)):  # 10 ms per token, no fixed cost
        link.stage_cost.observe(tokens, seconds)
    for nbytes, seconds in ((1000, 0.051), (1_001_000, 1.051)):  # 50 ms round trip, 1 MB/s
        link.link_cost.observe(nbytes, seconds)
    assert link.step_deadline(1, 0) == L.STEP_DEADLINE_FLOOR  # 8 x 0.06 s is below the floor
    expected = L.STEP_DEADLINE_FACTOR * (0.64 + 0.05 + 1.0)  # above the floor
    assert expected > L.STEP_DEADLINE_FLOOR
    assert link.step_deadline(64, 1_000_000) == pytest.approx(expected, rel=1e-6)


def test_an_unanswered_step_is_late_after_its_deadline_counted_from_the_last_answer():
    async def main() -> None:
        link = _link()
        link.move(LinkState.READY)
        t = link.alive.heard_at
        fut = asyncio.get_running_loop().create_future()
        link._pending[7] = _Pending(fut, sent_at=t, deadline=3.0)
        # pongs keep coming (the loop lives, its stage does not): only the step clause can say hung
        link.alive.heard_at = t + 3.5
        assert link.hung(t + 2.9) is None
        why = link.hung(t + 3.1)
        assert why is not None and "step 7" in why
        link.alive.answered_at = t + 2.0  # an answer to another step: the clock restarts there
        assert link.hung(t + 4.9) is None
        assert link.hung(t + 5.1) is not None

    run(main(), 10)


def test_a_late_answer_to_a_step_given_up_on_restarts_the_clock_of_the_steps_behind_it():
    """A stage that was only late (a step given up on, then sent again) computes the late step
    before the new one: its late ``Result`` or ``Failure`` shows progress, and the new step's
    deadline counts from it, not from when the new step went out."""

    async def main() -> list[tuple[str | None, str | None]]:
        seen = []
        for late in (Result(5, 0, 0.1, 0.1, torch.zeros(1, 4)), Failure("its requests ended", step_id=5)):
            link = _link()
            link.move(LinkState.READY)
            t = time.monotonic() - 2.0  # the new step went out 2 s ago; the late answer comes now
            link._abandoned.append(5)
            fut = asyncio.get_running_loop().create_future()
            link._pending[6] = _Pending(fut, sent_at=t, deadline=3.0)
            link.alive.heard_at = t + 5.0  # pongs keep coming
            before = link.hung(t + 3.1)
            link._dispatch(late)
            seen.append((before, link.hung(t + 3.1)))
            assert link.hung(t + 5.1) is not None  # and the new step has its own deadline from there
        return seen

    for before, after in run(main(), 10):
        assert before is not None and "step 6" in before
        assert after is None


def test_a_dropped_link_fails_its_waiters_tells_the_group_and_counts_late_frames():
    async def main() -> tuple[list[str], int, bool]:
        link = _link()
        link.move(LinkState.READY)
        gone: list[str] = []
        late = [0]
        link.on_gone = lambda lk: gone.append(lk.name)
        link.on_late = lambda: late.__setitem__(0, late[0] + 1)
        fut = asyncio.get_running_loop().create_future()
        link._pending[1] = _Pending(fut, sent_at=0.0, deadline=1.0)
        link.drop("unresponsive: test")
        link._dispatch(object())  # any frame after the drop is dropped and counted, never parsed
        failed = fut.done() and isinstance(fut.exception(), L.LinkGone)
        for task in list(link._tasks):  # the lingering close: not needed here
            task.cancel()
        await asyncio.gather(*link._tasks, return_exceptions=True)
        return gone, late[0], failed

    gone, late, failed = run(main(), 10)
    assert gone == ["w"] and late == 1 and failed


def test_only_a_dropped_link_that_is_heard_again_counts_as_waking(caplog):
    """A link closed for another reason (the master stopping, a protocol error) whose last bytes
    arrive before its tunnel closes was not judged hung: no "speaks again" warning for it."""

    async def main() -> tuple[float | None, float | None]:
        closed, dropped = _link(), _link()
        for link in (closed, dropped):
            link.move(LinkState.READY)
        closed.close_with("the master stopped")
        dropped.drop("unresponsive: test")
        for link in (closed, dropped):
            link._heard(link.alive.heard_at + 1.0)
        for link in (closed, dropped):
            for task in list(link._tasks):
                task.cancel()
            await asyncio.gather(*link._tasks, return_exceptions=True)
        return closed._woke_at, dropped._woke_at

    closed, dropped = run(main(), 10)
    assert closed is None and dropped is not None
    assert caplog.text.count("speaks again") == 1


def test_a_busy_stage_gets_longer_deadlines_but_a_healthy_one_keeps_its_own():
    """The fit follows the fastest observations; when the machine gets busy (other work on its
    cores) each step takes several times the prediction, and the deadline grows with that
    slowdown instead of dropping a healthy, merely slow, worker.  A stage that stops answering
    reports no steps, so its slowdown (and deadline) stays where it was."""
    busy, healthy = _link(), _link()
    for link in (busy, healthy):
        for tokens, seconds in ((1, 0.01), (64, 0.64), (1, 0.01), (64, 0.64)):
            link.stage_cost.observe(tokens, seconds)
        for nbytes, seconds in ((1000, 0.051), (1_001_000, 1.051)):
            link.link_cost.observe(nbytes, seconds)
    before = healthy.step_deadline(1024, 1_000_000)
    assert before == pytest.approx(L.STEP_DEADLINE_FACTOR * (10.24 + 0.05 + 1.0), rel=0.05)
    for _ in range(12):  # the same steps now take 12 times as long
        busy.stage_cost.observe(16, 0.16 * 12)
        healthy.stage_cost.observe(16, 0.16)
    assert healthy.stage_cost.slowdown() == pytest.approx(1.0)
    assert healthy.step_deadline(1024, 1_000_000) == pytest.approx(before, rel=0.05)
    assert busy.stage_cost.slowdown() > 8
    takes = 12 * 10.24 + 1.05  # a 1024-token step on the busy stage really takes this long
    assert before < takes  # the unscaled deadline would drop this healthy, busy worker
    assert busy.step_deadline(1024, 1_000_000) > 1.4 * takes


def test_a_stage_whose_compute_call_runs_past_its_predicted_time_plus_the_stuck_limit_is_hung():
    """Pulses (the pongs' payload) tell a stage computing slowly, whose calls still finish, from
    one whose compute call never ends while its loop answers pings."""
    from worker_core.wire import pulse, read_pulse

    assert read_pulse(pulse(7, True)) == (7, True) and read_pulse(pulse(8, False)) == (8, False)
    assert read_pulse(b"") is None and read_pulse(b"\x00" * 8 + b"\x02") is None

    async def main() -> None:
        link = _link()
        fut = asyncio.get_running_loop().create_future()
        link._pending[1] = _Pending(fut, 0.0, 1e9, 16)  # a step out (its own deadline far away)
        for tokens, seconds in ((1, 0.01), (64, 0.64)):  # 10 ms per token
            link.stage_cost.observe(tokens, seconds)
        limit = LV.STUCK_LIMIT + 0.16  # the step's 16 tokens predicted at 0.16 s
        assert link.alive.stuck_limit(link._pending, link.stage_cost) == pytest.approx(limit)
        t = 1000.0
        link.alive.pulse(pulse(5, True), t)  # a compute call starts
        for dt in (0.5, 1.0, limit - 0.1):
            link.alive.heard_at = t + dt
            link.alive.pulse(pulse(5, True), t + dt)  # the same call, still running
            assert link.hung(t + dt) is None
        link.alive.heard_at = t + limit + 0.1
        why = link.hung(t + limit + 0.1)
        assert why is not None and why.startswith("computing without progress")
        # calls that finish keep it alive however slow the stage is; an idle stage is not judged
        for i, dt in enumerate((1.0, 2.5, 4.0, 5.5, 7.0)):
            link.alive.heard_at = t + dt
            link.alive.pulse(pulse(6 + i, True), t + dt)
            assert link.hung(t + dt) is None
        link.alive.pulse(pulse(20, False), t + 10)
        link.alive.heard_at = t + 30
        assert link.hung(t + 30) is None
        link.alive.pulse(b"", t + 31)  # a worker without a stage yet says nothing of its compute
        assert link.alive.stuck_since is None
        fut.cancel()

    run(main(), 10)


def _paced(alive: LV.Liveness, start: float, until: float, every: float) -> float:
    """Hear the worker every ``every`` seconds from ``start`` to ``until``; the last time heard."""
    t = start
    while t + every <= until:
        t += every
        alive.heard(t)
    return t


def test_the_silent_limit_follows_the_pace_the_link_showed_alive_within_its_floor_and_ceiling():
    """A live worker's longest silence is about a ping interval plus its pong's delay; the link
    is hung after SILENT_MARGIN times the longest of the last SILENCE_WINDOW seconds, never
    sooner than SILENT_FLOOR nor later than SILENT_LIMIT (also before it showed its pace)."""
    stall = LV.Liveness(0.0)
    t = _paced(stall, 0.0, LV.SILENCE_LEARNING - 1, 0.3)
    assert stall.silent_limit(t, False) == LV.SILENT_LIMIT  # not yet learnt
    t = _paced(stall, t, 20.0, 0.3)
    assert stall.silent_limit(t, False) == LV.SILENT_FLOOR  # 2.5 x 0.3 s is below the floor
    assert stall.hung(t + LV.SILENT_FLOOR - 0.05, False, {}, StageCost()) is None
    why = stall.hung(t + LV.SILENT_FLOOR + 0.05, False, {}, StageCost())
    assert why is not None and why.startswith("silent for")
    assert stall.silent_limit(t, True) == LV.LOADING_SILENT_LIMIT

    busy = LV.Liveness(0.0)
    t = _paced(busy, 0.0, 20.0, 0.3)
    t += 0.7
    busy.heard(t)  # a pong delayed by a busy machine: its own limit rises
    t = _paced(busy, t, t + 5, 0.3)
    assert busy.silent_limit(t, False) == pytest.approx(LV.SILENT_MARGIN * 0.7)
    assert busy.hung(t + 1.5, False, {}, StageCost()) is None  # would have been hung at the floor
    t = _paced(busy, t, t + LV.SILENCE_WINDOW, 0.3)
    assert busy.silent_limit(t, False) == LV.SILENT_FLOOR  # forgotten after the window

    slow = LV.Liveness(0.0)
    t = _paced(slow, 0.0, 30.0, 1.2)
    assert slow.silent_limit(t, False) == LV.SILENT_LIMIT  # 2.5 x 1.2 s is above the ceiling

    loading = LV.Liveness(0.0)
    t = _paced(loading, 0.0, 20.0, 0.3)
    t += 10.0
    loading.heard(t, alive=False)  # silent while it loaded an assignment: not its pace
    assert loading.silent_limit(t, False) == LV.SILENT_FLOOR


def test_an_older_assignment_never_replaces_a_newer_one_in_flight():
    """A standby's whole-model load made for epoch E may reach WorkerLink.assign after a repair
    gave the member a stage of epoch E+1: it is refused (Superseded, nothing sent), and the
    repair's assignment is the one the worker's Ready answers."""
    from worker_core.wire import Assign, Ready

    async def main() -> None:
        link = _link()
        sent: list[object] = []

        async def send(msg: object) -> int:
            sent.append(msg)
            return 0

        link._send = send  # type: ignore[method-assign]

        def plan(epoch: int, end: int) -> Assign:
            return Assign(
                epoch=epoch, model="m", layer_start=0, layer_end=end, num_layers=30, max_batch_tokens=64, kv_tokens=100
            )

        repair = asyncio.create_task(link.assign(plan(6, 10), 5.0))
        await asyncio.sleep(0)
        with pytest.raises(L.Superseded):
            await link.assign(plan(5, 30), 5.0)
        assert [m.epoch for m in sent] == [6] and link.assignment is not None and link.assignment.epoch == 6  # type: ignore[attr-defined]
        link._dispatch(Ready(6, 64, 384, 0.1, 1000))
        assert (await asyncio.wait_for(repair, 1.0)).epoch == 6

    run(main())
