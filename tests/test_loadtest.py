"""The master load test runs end to end (small), and placement timing covers every size."""

from harness import run
from tiny_models import make_tiny_checkpoint

from app.tools.loadtest import LoadOptions, placement_times, run_load


def test_load_tool_streams_through_the_real_api_with_fake_stages(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "m", num_layers=4, seed=2)
    opts = LoadOptions(model=str(path), streams=50, tokens=8, stages=2, timeout=120.0)
    r = run(run_load(opts), timeout=300.0)
    assert r["errors"] == [] and r["streams_ok"] == 50
    assert r["tokens"] == 50 * 8  # every token reached its client as one SSE event
    # two fake stages: every round crosses both, each step was answered by a fake stage
    assert r["stage_steps"] >= 2 * 8
    assert 0 < r["gap_p50_ms"] <= r["gap_p99_ms"] and 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"] and r["ttft_p50_ms"] > 0
    assert r["master_cpu_seconds"] > 0 and r["master_cpu_ms_per_token"] > 0


def test_placement_timing_reports_each_group_size():
    out = placement_times((8, 64), repeats=2)
    assert set(out) == {8, 64}
    assert all(row["max_ms"] >= row["median_ms"] > 0 and len(row["members_used"]) == 2 for row in out.values())
