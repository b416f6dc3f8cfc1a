"""The command line: clear one-line refusals, API key storage."""

import errno
import os
import stat
import sys
import types

from app import cli
from app.cli import group as cli_group


def test_non_loopback_bind_without_key_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_group, "_config_dir", lambda: tmp_path)
    monkeypatch.setattr("master_core.secrets_store._keyring", lambda: None)
    assert cli.main(["master", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_api_key_is_created_stored_0600_and_read_back(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_group, "_config_dir", lambda: tmp_path)
    monkeypatch.setattr("master_core.secrets_store._keyring", lambda: None)  # no OS keyring: the file fallback
    assert cli.main(["api-key"]) == 1
    assert cli.main(["api-key", "--new"]) == 0
    key = capsys.readouterr().out.split()[0]
    assert key.startswith("sk-molink-") and len(key) > 30
    mode = stat.S_IMODE((tmp_path / "api-key").stat().st_mode)
    assert mode == 0o600 or sys.platform == "win32"  # Windows has no modes: the folder's ACL protects it
    assert cli.main(["api-key"]) == 0 and capsys.readouterr().out.strip() == key


def test_unknown_device_and_bad_model_fail_in_one_line(capsys):
    assert cli.main(["worker", "--master", "127.0.0.1:1", "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert cli.main(["master", "--model", "/no/such/folder", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "neither 'default', an existing folder, nor a hub id" in err and "Traceback" not in err


def _one_gpu_nvml() -> types.ModuleType:
    """A stand-in for pynvml on a machine with one 8 GiB GPU (whatever this machine has)."""
    m = types.ModuleType("pynvml")
    m.nvmlInit = m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "550.54.14"
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=8 * 2**30, free=6 * 2**30)
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 6)
    m.nvmlDeviceGetName = lambda h: "NVIDIA GeForce RTX 3070"
    return m


def test_probe_reports_cpu_and_measures_with_and_without_a_gpu_driver(capsys, monkeypatch):
    import json

    from worker_core.probe import nvidia_gpus, probe

    # no NVIDIA library or driver (pynvml missing): no GPU, no error, whatever this machine has
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert nvidia_gpus() == []
    p = probe("cpu", master="127.0.0.1:9")  # nothing listens on port 9: unreachable, not an error
    assert p.device == "cpu" and p.cpu_cores >= 1 and p.ram_total > p.ram_available > 0
    assert p.matmul_gflops > 0.1 and p.rtt_ms is None
    assert cli.main(["probe", "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "cpu" and data["gpus"] == []
    assert cli.main(["probe", "--device", "cpu"]) == 0
    assert "GPU: none found" in capsys.readouterr().out

    # a driver with one GPU: listed, even when the worker is told to compute on the CPU
    monkeypatch.setitem(sys.modules, "pynvml", _one_gpu_nvml())
    assert cli.main(["probe", "--device", "cpu", "--json"]) == 0
    gpus = json.loads(capsys.readouterr().out)["gpus"]
    assert [(g["name"], g["total_memory"], g["compute_capability"], g["driver"]) for g in gpus] == [
        ("NVIDIA GeForce RTX 3070", 8 * 2**30, "8.6", "550.54.14")
    ]
    assert cli.main(["probe", "--device", "cpu"]) == 0
    assert "GPU 0: NVIDIA GeForce RTX 3070, 6.0 of 8.0 GiB free, compute 8.6" in capsys.readouterr().out


def test_probe_times_the_round_trip_to_a_master(tmp_path):
    from harness import Cluster, run
    from tiny_models import make_tiny_checkpoint

    from worker_core.probe import measure_link

    ckpt = make_tiny_checkpoint("llama", tmp_path / "m", num_layers=2)

    async def main():
        async with Cluster(ckpt, workers=1) as c:
            return await measure_link(f"http://{c.master.address}")

    rtt, mbps = run(main())
    assert rtt is not None and 0 < rtt < 1000
    assert mbps is None  # a plain master has no bandwidth probe


def test_port_in_use_is_one_line(capsys, tmp_path):
    import socket

    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("llama", tmp_path / "ckpt", num_layers=2)
    capsys.readouterr()  # the fixture's own progress output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        code = cli.main(
            [
                "group",
                "create",
                "--model",
                str(ckpt),
                "--host",
                "127.0.0.1",
                "--port",
                str(busy),
                "--api-port",
                "0",
                "--data-dir",
                str(tmp_path / "g"),
            ]
        )
    err = capsys.readouterr().err
    # the OS's own words for EADDRINUSE (English here; Windows says "Only one usage of each socket address")
    in_use = os.strerror(errno.EADDRINUSE).lower() if sys.platform != "win32" else "only one usage"
    assert code == 2 and in_use in err.lower() and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
