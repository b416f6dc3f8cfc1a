"""`molink app --selftest`: the app's own paths end to end (real master and worker on the default model)."""

import subprocess
import sys

import pytest

pytest.importorskip("pytestqt")


pytestmark = pytest.mark.slow  # the whole app with real engine children


def test_app_selftest_creates_a_group_shares_and_chats():
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "app", "--selftest"], capture_output=True, text=True, timeout=900
    )
    out = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert out[0] == "menu:" and "  Share my GPU (join or create a group first)" in out and "  Quit MoLink" in out
    assert any(line.startswith("sharing: layers 0-29 of 30; group serving") for line in out)
    assert any(line.startswith("question: ") for line in out)
    answer = next(line for line in out if line.startswith("answer (streamed in "))
    assert len(answer.split(": ", 1)[1]) > 3
    assert out[-1] == "OK"
    assert "Traceback" not in r.stderr


def test_app_selftest_fails_with_one_line(tmp_path):
    code = f"import sys; from app.desktop.selftest import run; sys.exit(run(model={str(tmp_path / 'no-such-model')!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    failed = [line for line in r.stdout.splitlines() if line.startswith("selftest failed: ")]
    assert len(failed) == 1 and "cannot create the group" in failed[0], r.stdout
