"""The burst bench's figures from fabricated token times and step timelines (no group runs)."""

from __future__ import annotations

import pytest

from app.tools.bench.burst import BurstShape, burst_shape, gap_figures, stall_report
from app.tools.bench.options import BenchOptions


def _step(began: float, ended: float, decodes: int, prefill: int, computes: list[float], queued: float) -> dict:
    return {
        "began": began,
        "ended": ended,
        "decodes": decodes,
        "prefill_tokens": prefill,
        "computes": computes,
        "queued": queued,
        "legs": 1,
        "failed": None,
        "waiting": 0,
        "running": 2,
    }


def test_the_longest_gap_is_traced_to_the_step_that_ended_it_and_the_prefill_beside_it():
    times = [[0.0, 0.2, 0.4, 2.4, 2.6]]  # one 2 s gap ending at 2.4
    steps = [
        _step(0.0, 0.2, 1, 0, [0.05, 0.05], 0.0),
        _step(0.3, 2.3, 0, 512, [0.9, 0.9], 0.0),  # a prompt chunk beside the slow decode step
        _step(0.4, 2.4, 1, 0, [0.05, 0.05], 1.5),  # the decode step that ended the gap
        _step(2.4, 2.6, 1, 0, [0.05, 0.05], 0.0),
    ]
    worst = stall_report(times, steps, worst=1)[0]
    assert worst["gap"] == pytest.approx(2.0)
    assert worst["step_seconds"] == pytest.approx(2.0)
    assert worst["compute"] == pytest.approx(0.1)
    assert worst["queued_last"] == pytest.approx(1.5)
    assert worst["rest"] == pytest.approx(0.4)
    assert worst["prefill_beside"] == 512 and worst["prefill_with_it"] == 0


def test_gap_figures_and_the_burst_shape_from_options():
    f = gap_figures([[0.0, 0.1, 0.2, 0.3], [0.0, 0.1, 1.1]])
    assert f["gaps"] == 5 and f["gap_max"] == pytest.approx(1.0)
    shape = burst_shape(BenchOptions(burst_prompts=(1300, 1300, 1300), burst_spacing=1.5, burst_streams=2))
    assert (shape.streams, shape.burst_prompts, shape.burst_spacing) == (2, (1300, 1300, 1300), 1.5)
    assert burst_shape(BenchOptions()) == BurstShape()


def test_the_lab_burst_judges_gaps_during_the_burst_against_the_calm_median():
    """app.tools.netlab.burstlab's figures: gaps ending before the first long prompt was sent are
    calm, those ending until the last answer are the burst's; a prompt never answered is None."""
    from app.tools.netlab.burstlab import gaps_report

    calm = [0.1 * k for k in range(11)]  # 10 gaps of 0.1 s up to t = 1.0
    burst = [1.0 + 0.2 * k for k in range(1, 11)]  # 10 gaps of 0.2 s, t = 1.2 .. 3.0, one of 0.5 s after
    one = [*calm, *burst, 3.5, 9.0]  # the gap ending at 9.0 is after the burst: not counted
    r = gaps_report([one], sent=[1.05, 1.5], answers=[2.0, 3.5])
    assert r["calm_gaps"] == 10 and abs(r["calm_p50_s"] - 0.1) < 1e-9
    assert r["burst_gaps"] == 11 and abs(r["burst_p99_s"] - 0.5) < 1e-9 and abs(r["burst_p50_s"] - 0.2) < 1e-9
    assert abs(r["burst_p99_over_calm_p50"] - 5.0) < 1e-6
    assert [round(x, 6) for x in r["long_prompt_seconds"]] == [0.95, 2.0] and abs(r["burst_seconds"] - 2.45) < 1e-9
    unanswered = gaps_report([one], sent=[1.05, 1.5], answers=[2.0, None])
    # one never answered: the burst lasted to the end of the record (the gap of 5.5 s ending at 9.0 counts)
    assert unanswered["long_prompt_seconds"][1] is None and unanswered["burst_gaps"] == 12
    assert abs(unanswered["burst_p99_s"] - 5.5) < 1e-9


def test_the_lab_burst_says_the_links_share_of_the_bursts_decode_steps():
    """burstlab's ``burst_links``: a step's wall time minus every stage's hold, for the steps that
    began during the burst and carried decode steps with every hold known."""
    from app.tools.netlab.burstlab import links_share

    def step(began: float, wall: float, decodes: int, held: list[float]) -> dict:
        return {"began": began, "ended": began + wall, "decodes": decodes, "held": held}

    steps = [
        step(0.5, 0.3, 3, [0.1, 0.1]),  # before the burst: not counted
        *(step(1.0 + 0.1 * k, 0.25, 3, [0.1, 0.1]) for k in range(9)),  # 0.05 s outside the stages
        step(2.0, 0.5, 3, [0.1, 0.1]),  # 0.3 s: a decode frame behind a prompt's bytes
        step(2.1, 1.0, 0, [0.4, 0.4]),  # prefill alone: not counted
        step(2.2, 0.3, 3, []),  # a stage that did not say: not counted
        step(5.0, 0.3, 3, [0.1, 0.1]),  # after the last answer: not counted
    ]
    got = links_share(steps, sent=[1.0, 1.5], answers=[2.5, 3.0])
    assert got["steps"] == 10
    assert abs(got["p50_s"] - 0.05) < 1e-9 and abs(got["p99_s"] - 0.3) < 1e-9
