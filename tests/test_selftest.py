"""`molink selftest` from the source checkout: two worker processes vs one process, exit codes."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.tools import selftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_path):
    """The user's folders moved under tmp_path: the default model is converted into a throwaway cache."""
    env = dict(os.environ)
    for var, sub in (
        ("HOME", "home"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_DATA_HOME", "data"),
        ("XDG_CONFIG_HOME", "config"),
    ):
        (tmp_path / sub).mkdir(exist_ok=True)
        env[var] = str(tmp_path / sub)
    return env


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` copied to ``dst`` as hard links where the file system allows (else copies)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`molink selftest` run once in a fresh user whose cache already holds the converted default
    model (linked from this machine's; the conversion is tested in test_default_model.py and, on
    a fresh user, by the installer's end-to-end test): the run the tests below share."""
    from worker_core.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    home = tmp_path_factory.mktemp("selftest-user")
    env = _env(home)
    weights = home / "cache" / "molink" / "models" / DEFAULT_MODEL_NAME / "model.safetensors"
    _link_tree(ensure_default_model(), weights.parent)
    before = weights.stat().st_ino
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "selftest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert weights.stat().st_ino == before, "the selftest converted the default model again"
    return out, home


def test_selftest_splits_the_default_model_over_two_workers_and_matches_one_process(first_run):
    out, tmp_path = first_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for key in ("molink:", "python:", "torch: 2.13.0", "transformers:", "device: cpu"):
        assert any(line.startswith(key) for line in lines), key
    stages = [line for line in lines if line.startswith("stage ")]
    assert (
        len(stages) == 2 and stages[0].startswith("stage 0: selftest-") and stages[1].startswith("stage 1: selftest-")
    )
    assert stages[0].endswith("(cpu) layers [0, 15)") and stages[1].endswith("(cpu) layers [15, 30)")
    assert {s.split()[2] for s in stages} == {"selftest-1", "selftest-2"}  # both worker processes serve
    pipeline = next(line for line in lines if line.startswith("pipeline (2 worker processes):"))
    single = next(line for line in lines if line.startswith("one process (transformers):"))
    assert pipeline.split(":", 1)[1].strip() == single.split(":", 1)[1].strip()
    assert pipeline.count(",") >= 7  # 8 token ids
    assert lines[-1].startswith("OK")


def test_a_device_that_does_not_exist_fails_with_one_line_and_exit_1(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "selftest", "--device", "cuda:7"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert out.stdout.splitlines()[-1].startswith("selftest failed: DeviceError: device 'cuda:7' not available")
    assert "OK" not in out.stdout.splitlines()


def test_tokens_that_differ_from_the_single_process_run_fail(monkeypatch, first_run):
    """The comparison itself: a pipeline answer one token off is a failure (exit 1), not OK."""
    from worker_core import default_model

    _, home = first_run
    models = home / "cache" / "molink" / "models"
    converted = models / default_model.DEFAULT_MODEL_NAME / default_model.MARKER
    assert converted.is_file(), "the shared `molink selftest` user has no converted default model"
    monkeypatch.setattr(default_model, "_models_dir", lambda root: models)
    real = selftest.reference_tokens

    def one_off(folder, prompt, tokens, device):
        ids = real(folder, prompt, tokens, device)
        return ids[:-1] + [ids[-1] + 1]

    monkeypatch.setattr(selftest, "reference_tokens", one_off)
    buf = io.StringIO()
    assert selftest.run_selftest(selftest.SelftestOptions(device="cpu"), buf) == 1
    lines = buf.getvalue().splitlines()
    assert lines[-1] == "selftest failed: the pipeline's 8 greedy tokens differ from the single-process run"
    assert not any(line.startswith("OK") for line in lines)


def test_a_missing_engine_package_fails_with_how_to_repair_it(monkeypatch):
    """A runtime whose torch was deleted or quarantined: one line that says how to repair it, exit 1."""

    def no_torch() -> dict[str, str]:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(selftest, "versions", no_torch)
    buf = io.StringIO()
    assert selftest.run_selftest(selftest.SelftestOptions(device="cpu"), buf) == 1
    assert buf.getvalue().splitlines() == [
        "selftest failed: ModuleNotFoundError: No module named 'torch'; the engine's packages are incomplete: "
        "in an installed MoLink run `molink runtime install --repair`, from a source checkout reinstall its "
        "dependencies"
    ]
