"""A real `molink bench` run's report (app.tools.bench.run): its figures, and each request's time
to first token in the order the requests arrived, on a small in-process group of a tiny model."""

from __future__ import annotations

import statistics

import pytest
from harness import Cluster, run
from tiny_models import make_tiny_checkpoint

from app.tools.bench.idle import idle_curves, physics_curves
from app.tools.bench.run import _prompts, _run_policy, busy_series, cpu_load, median_calibration
from master_core.costs import CostSnapshot
from master_core.request import SamplingParams
from master_core.workload import BenchRequest, percentile

MAX_BATCH_TOKENS = 16  # small prefill chunks: the long prompt below takes many steps to its first token
LONG = 2  # the request with the long prompt
# one at a time (0.4 s apart, a few tokens each), so each request's first token waits only on its own prompt
WORKLOAD = [BenchRequest(0.4 * i, 400 if i == LONG else 4, 4) for i in range(6)]


class _Bar:
    def update(self, n: int) -> None:
        pass


def test_a_real_runs_report_has_each_requests_time_to_first_token_in_arrival_order(tmp_path):
    folder = make_tiny_checkpoint("llama", tmp_path / "m", num_layers=4, seed=4)

    async def main() -> dict:
        async with Cluster(folder, workers=2, max_batch_tokens=MAX_BATCH_TOKENS) as c:
            prompts = _prompts(WORKLOAD, c.master.dims.vocab_size, seed=0)
            warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            await c.engine.generate(prompts[0], warm)  # as the bench does: fresh stages' first steps are slow
            links = c.master.group.stages
            curves, policy = [k.stage_cost.curve() for k in links], c.engine.policy
            alone = _prompts([BenchRequest(0.0, n, 1) for n in (8, 16)], c.master.dims.vocab_size, seed=1)
            idle = await idle_curves(c.master, alone)
            # each stage measured each prompt as one step, and the master's costs are as they were
            assert [[x for x, _ in p] for p in idle] == [[8.0, 16.0]] * len(links), idle
            assert all(s > 0 for p in idle for _, s in p), idle
            assert [k.stage_cost.curve() for k in links] == curves and c.engine.policy is policy
            figures, outputs = await _run_policy(c.master, "full", WORKLOAD, prompts, 100.0, _Bar())
            assert [len(o) for o in outputs] == [w.output_tokens for w in WORKLOAD]
            return figures

    r = run(main(), 240)
    assert 0 <= r["cpu_seconds"]["copies"] <= r["cpu_seconds"]["workers"] + 1.0  # (CPU accounting ticks coarsely)
    assert [t for t, _ in r["copy_cores"]] == [t for t, _ in r["other_cores"]]  # sampled together
    assert r["requests"] == len(WORKLOAD) and r["output_tokens"] == sum(w.output_tokens for w in WORKLOAD)
    assert 0 < r["ttft_p50"] <= r["ttft_p99"] and 0 < r["tpot_p50"] <= r["tpot_p99"]
    ttfts = r["ttfts"]
    assert len(ttfts) == len(WORKLOAD) and all(isinstance(t, float) and t > 0 for t in ttfts), ttfts
    # the percentiles the report gives are those of these very values (nearest rank)
    assert percentile(ttfts, 50) == r["ttft_p50"] and percentile(ttfts, 99) == r["ttft_p99"]
    assert min(ttfts) <= r["ttft_p50"] <= r["ttft_p99"] <= max(ttfts)
    # in the workload's (arrival) order: the long prompt's 25 chunks make its first token come late
    # (about 10 times the others' here; a median, so one short request slowed by a busy machine does not matter)
    assert ttfts[LONG] > 3 * statistics.median(t for i, t in enumerate(ttfts) if i != LONG), ttfts
    # every step's record says the load it went under: micro-batches kept in flight, lanes
    # looping back, and which step of its loop it was (a step carrying a prompt the master sent)
    steps = r["steps"]
    assert steps and all(s["slots"] >= 1 and s["looping"] >= 0 and s["fed"] >= 0 for s in steps), steps[:3]
    assert all(s["fed"] == 0 for s in steps if s["prefill_tokens"]), [s for s in steps if s["prefill_tokens"]][:3]
    # and how long each stage held it, from its arrival to handing it on: at least its compute, and within
    # the step's own record when the master sent it (a step fed back is on its way before the master awaits it)
    for s in steps:
        assert len(s["held"]) == len(s["computes"]) == 2, s
        assert all(c <= h for c, h in zip(s["computes"], s["held"])), s
        assert s["fed"] or sum(s["held"]) <= s["ended"] - s["began"], s


def test_the_calibration_computes_longer_steps_at_what_they_cost_alone():
    """Below the smallest size measured alone, a stage's curve as the run measured it; from there
    on, the steps measured alone (the run's long steps all shared the cores with other stages)."""
    curves = (((1.0, 0.01), (64.0, 0.06), (261.0, 0.29)), ((1.0, 0.02), (300.0, 0.4)))
    idle = (((128.0, 0.11), (256.0, 0.22)), ())
    assert physics_curves(curves, idle) == (
        ((1.0, 0.01), (64.0, 0.06), (128.0, 0.11), (256.0, 0.22)),
        ((1.0, 0.02), (300.0, 0.4)),  # nothing measured alone: the run's curve
    )


def test_the_calibration_counts_the_copies_compute_as_load_beside_the_steps_not_as_each_steps_overhead():
    """The stages' copies (master_core.copies) compute in the workers between their steps: the
    simulator is given that CPU as cores kept busy (``device_busy``), not as time added to every
    step (``step_overhead``), which made every simulated step slower by the copies' share."""
    costs = CostSnapshot((0.01,) * 2, (0.001,) * 2, (0.02,) * 2, (1e7,) * 2, 64, 64, devices=(0, 0), device_slots=(2,))
    curves = (((1.0, 0.01), (100.0, 0.1)),) * 2
    steps = [{"computes": [0.01, 0.01], "failed": False, "decodes": 1, "prefill_tokens": 0, "drafts": 0}] * 100
    cpu = {"master": 1.0, "workers": 8.0, "machine_busy": 9.0, "wall": 10.0}  # 200 steps priced at 2 s
    before = cpu_load({"cpu_seconds": cpu, "steps": steps}, curves, costs)
    assert before["device_busy"] == (0.1,) and abs(before["step_overhead"] - 6.0 / 200) < 1e-9  # (a report from before)
    after = cpu_load({"cpu_seconds": {**cpu, "copies": 5.0}, "steps": steps}, curves, costs)
    assert after["device_busy"] == (0.6,) and abs(after["step_overhead"] - 1.0 / 200) < 1e-9
    # and as they varied: the copies' cores are added to the other work's, sample by sample
    real = {"other_cores": [(0.0, 0.1), (0.5, 0.2)], "copy_cores": [(0.0, 0.0), (0.5, 0.5)]}
    assert busy_series(real) == ((0.0, 0.1), (0.5, 0.7))
    assert busy_series({"other_cores": real["other_cores"]}) == ((0.0, 0.1), (0.5, 0.2))


def test_the_calibration_over_repeated_runs_is_each_figures_median_error_and_the_real_figures_range():
    def run(ttft_real: float, ttft_err: float, tps_err: float) -> dict:
        return {
            "full": {
                "ttft_p50": {"real": ttft_real, "simulated": ttft_real * (1 + ttft_err), "error": ttft_err},
                "output_tokens_per_s": {"real": 30.0, "simulated": 30.0 * (1 + tps_err), "error": tps_err},
                "model": {"device_busy": (0.1,), "step_overhead": 0.001},
            }
        }

    runs = [run(3.0, -0.4, 0.05), None, run(4.4, 0.1, -0.02), run(2.9, 0.08, 0.01)]  # one run not calibrated
    m = median_calibration(runs)
    assert set(m) == {"full"} and set(m["full"]) == {"ttft_p50", "output_tokens_per_s"}  # no "model"
    assert m["full"]["ttft_p50"] == {"error": 0.08, "errors": [-0.4, 0.1, 0.08], "real_range": (2.9, 4.4)}
    assert m["full"]["output_tokens_per_s"]["error"] == 0.01
    assert median_calibration([run(3.0, 0.2, 0.0)])["full"]["ttft_p50"]["error"] == 0.2  # one run: its own


def test_molink_bench_takes_its_repeats_and_refuses_fewer_than_one():
    from app.cli import _parser
    from app.cli.tools import bench

    p = _parser()
    assert p.parse_args(["bench"]).repeats == 1
    args = p.parse_args(["bench", "--repeats", "3", "--profiles", "slow"])
    assert callable(bench(args, None))  # type: ignore[arg-type]  # (the run is not started)
    with pytest.raises(ValueError, match="repeats"):
        bench(p.parse_args(["bench", "--repeats", "0"]), None)  # type: ignore[arg-type]
