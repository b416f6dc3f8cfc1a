"""The command line: clear one-line refusals, API key storage."""

import stat

import pytest

from app import cli


def test_non_loopback_bind_without_key_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_config_dir", lambda: tmp_path)
    monkeypatch.setattr("master_core.secrets_store._keyring", lambda: None)
    assert cli.main(["master", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_api_key_is_created_stored_0600_and_read_back(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_config_dir", lambda: tmp_path)
    monkeypatch.setattr("master_core.secrets_store._keyring", lambda: None)  # no OS keyring: the file fallback
    assert cli.main(["api-key"]) == 1
    assert cli.main(["api-key", "--new"]) == 0
    key = capsys.readouterr().out.split()[0]
    assert key.startswith("sk-molink-") and len(key) > 30
    mode = stat.S_IMODE((tmp_path / "api-key").stat().st_mode)
    assert mode == 0o600
    assert cli.main(["api-key"]) == 0 and capsys.readouterr().out.strip() == key


def test_unknown_device_and_bad_model_fail_in_one_line(capsys):
    assert cli.main(["worker", "--master", "127.0.0.1:1", "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert cli.main(["master", "--model", "/no/such/folder", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "neither 'default', an existing folder, nor a hub id" in err and "Traceback" not in err
