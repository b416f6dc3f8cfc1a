"""The simulator's physics (master_core.sim_pipeline): a stage's inbox and layer pauses as the
worker's, devices shared by processor sharing, links with the senders' priority; the measured
cost curve (master_core.costs.curve_seconds)."""

from __future__ import annotations

import pytest

from master_core.costs import CostSnapshot, StageCost, curve_seconds
from master_core.sim_pipeline import PATIENCE, Clock, Pipeline, SimStep
from worker_core.interleave import PAUSE_SECONDS

INF = float("inf")


def one_stage(layers: int, fixed: float = 0.0, per_token: float = 0.001, devices=(), slots=()) -> tuple:
    """A pipeline of stages computing ``fixed + per_token * n`` seconds, links without delay or
    bandwidth limit, and what came back when."""
    n = max(1, len(devices))
    c = CostSnapshot((fixed,) * n, (per_token,) * n, (0.0,) * n, (INF,) * n, 8, 8, devices=devices, device_slots=slots)
    clock = Clock()
    back: dict[str, float] = {}

    def on_back(step: SimStep) -> None:
        back[str(step.payload)] = clock.now

    pipe = Pipeline(c, clock, on_back, lambda s: s, (layers,) * n if layers else ())
    return pipe, clock, back


def send_at(pipe: Pipeline, clock: Clock, t: float, step: SimStep) -> None:
    clock.at(t, lambda: pipe.send(step))


def test_a_decode_step_arriving_during_a_long_prefill_waits_at_most_one_layer_run():
    """A 500-token prefill step of 10 layers (0.5 s, 50 ms a layer: longer than the 20 ms a run
    aims at, so one layer a run) is paused between its layers; a decode step arriving in the
    middle of a layer waits for that layer only, then runs whole."""
    pipe, clock, back = one_stage(layers=10)
    send_at(pipe, clock, 0.0, SimStep(500, 1, False, False, "prefill"))
    send_at(pipe, clock, 0.12, SimStep(1, 1, True, False, "decode"))  # mid third layer (0.10-0.15)
    clock.run()
    layer = 0.5 / 10
    assert layer > PAUSE_SECONDS
    assert back["decode"] == pytest.approx(0.15 + 0.001)  # waited 30 ms (< one layer), computed 1 ms
    assert back["decode"] - 0.12 - 0.001 <= layer + 1e-9
    # the pause costs no compute: the prefill ends later by the decode step's compute only
    assert back["prefill"] == pytest.approx(0.5 + 0.001)


def test_without_layers_a_decode_step_waits_for_the_whole_step():
    pipe, clock, back = one_stage(layers=0)
    send_at(pipe, clock, 0.0, SimStep(500, 1, False, False, "prefill"))
    send_at(pipe, clock, 0.12, SimStep(1, 1, True, False, "decode"))
    clock.run()
    assert back["prefill"] == pytest.approx(0.5) and back["decode"] == pytest.approx(0.501)


def test_a_short_step_runs_several_layers_a_run():
    """A 10-token step: 1 ms a layer, so LayerClock runs all 10 layers (10 ms, within the 20 ms
    a run aims at) at once: a decode step arriving at 1 ms waits for the whole step."""
    pipe, clock, back = one_stage(layers=10)
    send_at(pipe, clock, 0.0, SimStep(10, 1, False, False, "chunk"))
    send_at(pipe, clock, 0.001, SimStep(1, 1, True, False, "decode"))
    clock.run()
    assert back["chunk"] == pytest.approx(0.010)
    assert back["decode"] == pytest.approx(0.011)


def test_decode_steps_arriving_during_a_pause_wait_for_the_next_one():
    """A pause serves the decode steps queued when it began (Inbox.serve_urgent); one arriving
    while they compute waits for the next layer run."""
    pipe, clock, back = one_stage(layers=10, per_token=0.0001)  # 450 tokens: 4.5 ms a layer
    send_at(pipe, clock, 0.0, SimStep(450, 1, False, False, "prefill"))
    send_at(pipe, clock, 0.001, SimStep(100, 1, True, False, "d1"))  # a big "decode" step: 10 ms
    send_at(pipe, clock, 0.020, SimStep(1, 1, True, False, "d2"))  # arrives while d1 computes
    clock.run()
    # LayerClock as the start-up profile's 64-token step measured it: 0.01 ms a token-layer ->
    # 20 ms / (0.01 ms * 450) = 4 layers a run (18 ms); d1 waits for the first run, d2 for the next
    assert back["d1"] == pytest.approx(0.018 + 0.010)
    assert back["d2"] == pytest.approx(0.028 + 0.018 + 0.0001)
    assert back["prefill"] == pytest.approx(0.045 + 0.010 + 0.0001)


def test_the_layer_clock_starts_from_every_size_of_the_measured_curve():
    """The worker's LayerClock keeps the fastest compute per token-layer it has seen, and a
    stage's big steps are the cheapest per token (their fixed cost is shared).  Here, 40 layers:
    the profile's 64-token step costs 0.02 ms a token-layer, the curve's 200- and 400-token steps
    0.01 ms.  A 200-token prompt step then runs 20 ms / (0.01 ms x 200) = 10 layers a run, not
    the 5 the profile's step alone gives, and a decode step arriving waits for those 10."""
    c = CostSnapshot((0.0,), (0.001,), (0.0,), (INF,), 8, 8)
    curve = ((64.0, 0.0512), (200.0, 0.08), (400.0, 0.16))
    clock = Clock()
    back: dict[str, float] = {}
    pipe = Pipeline(
        c, clock, lambda s: back.__setitem__(str(s.payload), clock.now), lambda s: s, (40,), curves=(curve,)
    )
    send_at(pipe, clock, 0.0, SimStep(200, 1, False, False, "prompt"))
    send_at(pipe, clock, 0.0001, SimStep(1, 1, True, False, "decode"))
    clock.run()
    decode = curve_seconds(curve, 1)
    assert back["decode"] == pytest.approx(0.020 + decode)  # 10 layers of 2 ms, then the decode step
    assert back["prompt"] == pytest.approx(0.080 + decode)


def test_a_step_waiting_behind_decode_steps_goes_first_after_patience():
    """Decode steps go first, but a step that has waited PATIENCE seconds behind them goes next
    (worker_core.inbox.Inbox.get)."""
    pipe, clock, back = one_stage(layers=0, per_token=0.1)  # a decode step: 0.1 s
    send_at(pipe, clock, 0.0, SimStep(1, 1, True, False, "d0"))
    send_at(pipe, clock, 0.01, SimStep(2, 1, False, False, "prefill"))  # 0.2 s
    for i in range(1, 12):  # a decode step keeps arriving
        send_at(pipe, clock, 0.05 * i, SimStep(1, 1, True, False, f"d{i}"))
    clock.run()
    # d0 ends at 0.1; decode steps first until the prefill has waited PATIENCE (0.5 s): it starts
    # at the first end after 0.51, i.e. 0.6, and runs 0.2 s
    assert back["prefill"] == pytest.approx(0.6 + 0.2)
    assert back["d5"] == pytest.approx(0.6) and back["d6"] == pytest.approx(0.9)


def test_a_decode_frame_waits_for_one_piece_of_a_longer_frame_on_a_link():
    """A link sends a frame queued without urgency in pieces (worker_core.pieces; a stage's
    outbox, and the master's sends since protocol 13): a decode step's frame put while a 160 KiB
    prefill output is on a 1 MiB/s link leaves after the piece on the link (16 ms), not after the
    frame (156 ms); the prefill frame is delivered once, when its last piece is through."""
    from master_core.sim_pipeline import PART_BYTES, _Link

    clock = Clock()
    got: dict[str, float] = {}
    link = _Link(clock, float(1 << 20), 0.0)

    def send(name: str, nbytes: int, urgent: bool) -> None:
        link.send(nbytes, urgent, lambda: got.setdefault(name, clock.now))

    clock.at(0.0, lambda: send("prefill", 10 * PART_BYTES, False))
    clock.at(0.005, lambda: send("decode", 1024, True))
    clock.run()
    assert got["decode"] == pytest.approx(0.016 + 0.001, abs=2e-3) and got["prefill"] == pytest.approx(0.157, abs=2e-3)


def test_the_pieces_are_the_workers():
    pytest.importorskip("torch")
    from master_core.sim_pipeline import PART_BYTES
    from worker_core.wire import PART_BYTES as WORKER_PART_BYTES

    assert PART_BYTES == WORKER_PART_BYTES


def test_patience_is_the_workers():
    pytest.importorskip("torch")
    from worker_core.inbox import PATIENCE as WORKER_PATIENCE

    assert PATIENCE == WORKER_PATIENCE


def both_end(slots: int, busy: float = 0.0) -> list[float]:
    """When two stages of one device, each given 1 s of work at 0, end."""
    c = CostSnapshot((0.0,) * 2, (0.0,) * 2, (0.0,) * 2, (INF,) * 2, 8, 8, devices=(0, 0), device_slots=(slots,))
    clock = Clock()
    pipe = Pipeline(c, clock, lambda s: None, lambda s: s, busy=(busy,))
    ended: list[float] = []
    for stage in (0, 1):
        pipe.compute(stage, 1.0, lambda: ended.append(clock.now))
    clock.run()
    return ended


def test_stages_on_one_device_share_its_slots():
    """Two stages of one device computing at once: with one slot each runs at half speed (both
    end at 2 s for 1 s of work each), with two at full speed."""
    for slots, end in ((1, 2.0), (2, 1.0)):
        assert both_end(slots) == pytest.approx([end, end])
    # a late joiner: 1 s of work alone, then shared from 0.5 s: the first ends at 1.5 s
    pipe, clock, _ = one_stage(layers=0, devices=(0, 0), slots=(1,))
    ended = []
    pipe.compute(0, 1.0, lambda: ended.append(clock.now))
    clock.at(0.5, lambda: pipe.compute(1, 1.0, lambda: ended.append(clock.now)))
    clock.run()
    assert ended == pytest.approx([1.5, 2.0])
    # other work keeping one of two cores busy leaves the stages one: as one slot
    assert both_end(2, busy=1.0) == pytest.approx([2.0, 2.0])
    assert both_end(2, busy=0.5) == pytest.approx([4 / 3, 4 / 3])


def test_an_urgent_frame_overtakes_queued_ones_but_not_the_one_on_the_link():
    c = CostSnapshot((0.0,), (0.0,), (0.0,), (1000.0,), 8, 8)
    clock = Clock()
    pipe = Pipeline(c, clock, lambda s: None, lambda s: s)
    got: list[tuple[str, float]] = []
    up = pipe.up[0]
    up.send(1000, False, lambda: got.append(("a", clock.now)))  # 1 s on the link
    up.send(1000, False, lambda: got.append(("b", clock.now)))
    up.send(10, True, lambda: got.append(("urgent", clock.now)))
    clock.run()
    assert got == [("a", pytest.approx(1.0)), ("urgent", pytest.approx(1.01)), ("b", pytest.approx(2.01))]
    # the master's down link too (its sends in pieces, a decode step's passing: protocol 13)
    down = pipe.down[0]
    down.send(1000, False, lambda: got.append(("c", clock.now)))
    down.send(1000, False, lambda: got.append(("d", clock.now)))
    down.send(10, True, lambda: got.append(("e", clock.now)))
    clock.run()
    assert [g[0] for g in got[-3:]] == ["c", "e", "d"]


def test_curve_seconds_reads_the_measured_envelope():
    curve = ((1, 0.015), (2, 0.024), (45, 0.050), (212, 0.220))
    assert curve_seconds(curve, 1) == pytest.approx(0.015)  # not 1.5 ms, as the line said
    assert curve_seconds(curve, 0.5) == pytest.approx(0.015)
    assert curve_seconds(curve, 23.5) == pytest.approx(0.037)
    assert curve_seconds(curve, 312) == pytest.approx(0.220 + 100 * (0.170 / 167))  # the slope from 45 on
    # a larger step measured faster bounds a smaller one: never cheaper for more tokens
    assert curve_seconds(((1, 0.02), (4, 0.01), (64, 0.08)), 1) == pytest.approx(0.01)
    assert curve_seconds(((1, 0.02), (4, 0.01), (64, 0.08)), 4) == pytest.approx(0.01)
    assert curve_seconds(((16, 0.016),), 32) == pytest.approx(0.032)
    # measured on the slow bench (stage 1, 2026-12-06): the two largest points either side of a
    # size class's boundary; their slope put the 353-token first chunk at 0.68 s (it took 0.36 s)
    slow = ((1, 0.01), (16, 0.023), (33, 0.036), (64, 0.054), (247, 0.207), (261, 0.27))
    assert curve_seconds(slow, 353) == pytest.approx(0.27 + 92 * (0.27 - 0.054) / (261 - 64))
    assert 0.33 < curve_seconds(slow, 353) < 0.40
    with pytest.raises(ValueError):
        curve_seconds((), 1)


def test_stage_cost_curve_is_the_fastest_step_of_each_size_class():
    """Measured on the wan bench (stage 0, 2026-12-04): a CPU step grows faster than linearly,
    so the line through the envelope, led by the largest steps, predicts a one-row step at a
    tenth of its cost; the curve keeps it."""
    cost = StageCost()
    seen = ((1, 0.020), (1, 0.015), (2, 0.024), (3, 0.030), (45, 0.051), (212, 0.222), (310, 0.355), (512, 0.70))
    for tokens, seconds in seen:
        cost.observe(tokens, seconds)
    assert cost.curve() == ((1, 0.015), (2, 0.024), (45, 0.051), (212, 0.222), (310, 0.355), (512, 0.70))
    assert (cost.predict(1) or 0.0) < 0.1 * 0.015
    assert curve_seconds(cost.curve(), 1) == 0.015


def test_the_scheduler_decides_with_the_costs_of_the_time():
    """A calibration replays the fit the engine planned with as it moved (``plan_costs``): a plan
    snapshot without the loop-back from time 0 on makes the master send every step, as if the
    pipeline did not loop, while the physics stays the model's."""
    import dataclasses

    from master_core.scheduler import policy
    from master_core.simulator import SimModel, simulate
    from master_core.workload import BenchRequest

    inf = float("inf")
    c = CostSnapshot((0.01,) * 3, (0.0,) * 3, (0.08,) * 3, (inf,) * 3, 2304, 516, direct=(True, True), loop_back=True)
    one = [BenchRequest(0.0, 16, 9)]
    full = policy("full", 1024)
    looping = SimModel(c, kv_tokens=100_000)
    driven = dataclasses.replace(looping, costs=dataclasses.replace(c, loop_back=False))
    assert simulate(looping, one, full)["tpot_p50"] == pytest.approx(0.150)
    replayed = dataclasses.replace(looping, plan_costs=((0.0, driven.costs),))
    assert simulate(replayed, one, full) == simulate(driven, one, full)
    later = dataclasses.replace(looping, plan_costs=((100.0, driven.costs),))  # from 100 s on: never here
    assert simulate(later, one, full) == simulate(looping, one, full)


def test_other_work_that_varies_changes_the_stages_share_when_it_does():
    """``busy_series``: half the one core busy until 1 s, then none: 1 s of work ends at 1.5 s."""
    c = CostSnapshot((0.0,), (0.0,), (0.0,), (INF,), 8, 8, devices=(0,), device_slots=(1,))
    clock = Clock()
    pipe = Pipeline(c, clock, lambda s: None, lambda s: s, busy_series=((0.0, 0.5), (1.0, 0.0)))
    ended: list[float] = []
    pipe.compute(0, 1.0, lambda: ended.append(clock.now))
    clock.run()
    assert ended == pytest.approx([1.5])
