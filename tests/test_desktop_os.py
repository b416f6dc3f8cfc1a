"""The tray app's OS pieces without Qt: settings file, secrets, start at login, join links, auto-pause, NVML GPUs.

Everything OS-specific is faked: the keyring backend, the Windows registry, shell32 and NVML.  Nothing here
touches the real keyring, autostart folders, registry or config folders.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from app.desktop import settings
from app.desktop.settings import Paths, Settings
from app.desktop.system import _windows_autostart as winauto
from app.desktop.system import _windows_fullscreen as winfull
from app.desktop.system import autopause, autostart, secrets
from app.desktop.system.autopause import AutoPause, Decision, GpuLoad
from app.group import links

ROOT = Path(__file__).resolve().parents[1]


# ====================================================================== settings
def test_paths_under_root_and_default(tmp_path, monkeypatch):
    p = Paths.under(tmp_path)
    assert (p.config_dir, p.data_dir, p.logs_dir) == (tmp_path / "config", tmp_path / "data", tmp_path / "logs")
    assert p.master_dir == tmp_path / "data" / "master" and p.worker_dir == tmp_path / "data" / "worker"
    p.ensure()
    assert p.master_dir.is_dir() and p.worker_dir.is_dir() and p.logs_dir.is_dir()
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))
    d = Paths.default()
    assert d.config_dir == tmp_path / "XDG_CONFIG_HOME" / "molink"
    assert d.data_dir == tmp_path / "XDG_DATA_HOME" / "molink"
    assert tmp_path / "XDG_STATE_HOME" / "molink" in (d.logs_dir, *d.logs_dir.parents)
    assert not d.config_dir.exists()  # naming folders creates nothing


def test_settings_defaults_and_round_trip(tmp_path):
    paths = Paths.under(tmp_path)
    assert settings.load(paths) == Settings()
    s = Settings()
    assert (s.share_on_start, s.memory_limit_gb, s.device, s.auto_pause, s.start_at_login) == (
        False,
        None,
        "auto",
        False,
        False,
    )
    assert (s.model, s.group_name, s.group_port, s.chat_master, s.paused_until, s.first_run_done) == (
        "default",
        "",
        7733,
        "",
        None,
        False,
    )
    custom = Settings(
        share_on_start=True,
        memory_limit_gb=6.5,
        device="cuda:1",
        auto_pause=True,
        start_at_login=True,
        model="Qwen/Qwen2.5-7B-Instruct",
        group_name="Friends ✓",
        group_port=8000,
        group_host="100.64.1.2",
        chat_master="10.0.0.2:8000",
        paused_until=math.inf,
        first_run_done=True,
        firewall_ports=[7733, 7735],
        firewall_allowed=True,
        relay="relay.example.net:7735",
    )
    settings.save(paths, custom)
    assert settings.load(paths) == custom
    custom.paused_until = 1_700_000_000.5
    settings.save(paths, custom)
    assert settings.load(paths) == custom
    assert [f.name for f in paths.config_dir.iterdir()] == ["settings.json"]  # no temporary file left


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b'{"share_on_start": "yes"}',
        b'{"group_port": 70000}',
        b'{"group_port": true}',
        b'{"firewall_ports": [0]}',
        b'{"firewall_ports": 7733}',
        b'{"firewall_allowed": "yes"}',
        b'{"relay": "no port here"}',
        b'{"group_host": "my-pc.local"}',
        b'{"memory_limit_gb": -1}',
        b'{"memory_limit_gb": NaN}',
        b'{"paused_until": "tomorrow"}',
        b'{"device": 3}',
        b"\xff\xfe garbage",
    ],
)
def test_bad_settings_file_gives_defaults_and_is_kept(tmp_path, caplog, content):
    paths = Paths.under(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.settings_file.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="molink.settings"):
        assert settings.load(paths) == Settings()
    assert "damaged" in caplog.text
    assert (paths.config_dir / "settings.json.bad").read_bytes() == content
    assert not paths.settings_file.exists()
    settings.save(paths, Settings(device="cpu"))  # the next save works normally
    assert settings.load(paths).device == "cpu"


def test_unknown_keys_are_ignored(tmp_path):
    paths = Paths.under(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.settings_file.write_text(json.dumps({"device": "cpu", "future_feature": [1, 2], "memory_limit_gb": 4}))
    s = settings.load(paths)
    assert s == Settings(device="cpu", memory_limit_gb=4.0)
    assert isinstance(s.memory_limit_gb, float)
    assert not (paths.config_dir / "settings.json.bad").exists()


def test_save_retries_while_the_file_is_held(tmp_path, monkeypatch):
    paths = Paths.under(tmp_path)
    settings.save(paths, Settings(device="cpu"))
    real_replace, calls = os.replace, []

    def held_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "held by a scanner")
        real_replace(src, dst)

    monkeypatch.setattr(settings.os, "replace", held_twice)
    settings.save(paths, Settings(device="cuda"))
    assert len(calls) == 3 and settings.load(paths).device == "cuda"

    def always_held(src, dst):
        raise PermissionError(13, "held")

    monkeypatch.setattr(settings.os, "replace", always_held)
    with pytest.raises(PermissionError):
        settings.save(paths, Settings(device="cpu"))
    monkeypatch.setattr(settings.os, "replace", real_replace)
    assert settings.load(paths).device == "cuda"  # the old file is intact
    assert sorted(f.name for f in paths.config_dir.iterdir()) == ["settings.json"]  # temp file removed


# ====================================================================== secrets
class FakeKeyring:
    def __init__(self):
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service, name):
        return self.store.get((service, name))

    def set_password(self, service, name, value):
        self.store[(service, name)] = value

    def delete_password(self, service, name):
        from keyring.errors import PasswordDeleteError

        if (service, name) not in self.store:
            raise PasswordDeleteError("not found")
        del self.store[(service, name)]


class BrokenKeyring:
    def __init__(self, fail_on=("get", "set", "delete")):
        self.fail_on = fail_on
        self.inner = FakeKeyring()

    def get_password(self, service, name):
        if "get" in self.fail_on:
            raise RuntimeError("D-Bus: no secret service")
        return self.inner.get_password(service, name)

    def set_password(self, service, name, value):
        if "set" in self.fail_on:
            from keyring.errors import PasswordSetError

            raise PasswordSetError("locked")
        self.inner.set_password(service, name, value)

    def delete_password(self, service, name):
        if "delete" in self.fail_on:
            raise RuntimeError("gone")
        self.inner.delete_password(service, name)


def test_secrets_in_a_working_keyring(tmp_path):
    kr = FakeKeyring()
    store = secrets.SecretStore(tmp_path, backend=kr)
    assert store.get("api-key") is None
    store.set("api-key", "sk-molink-abc")
    assert kr.store == {("molink", "api-key"): "sk-molink-abc"}
    assert store.get("api-key") == "sk-molink-abc"
    store.delete("api-key")
    store.delete("api-key")  # a missing secret is not an error
    assert store.get("api-key") is None and kr.store == {}
    assert store.warning is None and store.uses_keyring
    assert list(tmp_path.iterdir()) == []  # nothing on disk


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX file modes")
def test_secrets_fall_back_to_a_private_file(tmp_path):
    store = secrets.SecretStore(tmp_path / "cfg", backend=BrokenKeyring())
    store.set("admin-token", "t0ken")
    assert store.warning is not None
    assert str(tmp_path / "cfg" / "secrets.json") in store.warning and "your user account only" in store.warning
    f = tmp_path / "cfg" / "secrets.json"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert json.loads(f.read_text()) == {"admin-token": "t0ken"}
    assert store.get("admin-token") == "t0ken"
    store.set("other", "x")
    store.delete("admin-token")
    assert store.get("admin-token") is None and store.get("other") == "x"
    store.delete("other")
    assert not f.exists()
    # a new store (the next launch) with a broken keyring reads what the file holds
    store.set("k", "v")
    assert secrets.SecretStore(tmp_path / "cfg", backend=BrokenKeyring()).get("k") == "v"


def test_secrets_warning_on_windows_does_not_promise_privacy(tmp_path):
    store = secrets.SecretStore(tmp_path, backend=BrokenKeyring(), platform="win32")
    store.set("k", "v")
    assert store.warning is not None and str(tmp_path / "secrets.json") in store.warning
    assert "only" not in store.warning and "0600" not in store.warning and "unencrypted" in store.warning
    assert store.get("k") == "v"


def test_fail_and_null_backends_mean_files(tmp_path):
    from keyring.backends import fail, null

    for backend in (fail.Keyring(), null.Keyring()):
        store = secrets.SecretStore(tmp_path / type(backend).__module__, backend=backend)
        assert store.warning is not None and not store.uses_keyring
        store.set("a", "1")
        assert store.get("a") == "1"


def test_default_backend_is_looked_up_once_and_reported_before_use(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(secrets, "_default_backend", lambda: calls.append(1))  # "no keyring here" (None)
    store = secrets.SecretStore(tmp_path)
    assert calls == []  # nothing looked up at construction
    assert store.warning is not None and "secrets.json" in store.warning  # known before the first secret
    store.set("a", "b")
    assert store.get("a") == "b" and calls == [1]
    kr = FakeKeyring()
    monkeypatch.setattr(secrets, "_default_backend", lambda: kr)
    store = secrets.SecretStore(tmp_path / "2")
    assert store.warning is None and store.uses_keyring
    store.set("a", "c")
    assert kr.store == {("molink", "a"): "c"}


def test_secret_written_during_a_fallback_is_found_and_moved(tmp_path):
    secrets.SecretStore(tmp_path, backend=BrokenKeyring()).set("tok", "old")  # keyring was down last time
    kr = FakeKeyring()
    store = secrets.SecretStore(tmp_path, backend=kr)
    assert store.get("tok") == "old"  # keyring empty: the file copy is found
    store.set("tok", "new")
    assert kr.store[("molink", "tok")] == "new" and not (tmp_path / "secrets.json").exists()
    assert store.warning is None


def test_keyring_failing_only_on_write_falls_back(tmp_path):
    store = secrets.SecretStore(tmp_path, backend=BrokenKeyring(fail_on=("set",)))
    assert store.get("x") is None and store.warning is None
    store.set("x", "y")
    assert store.warning is not None and store.get("x") == "y"


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", "x" * 65, "sp ace", None])
def test_secret_names_are_checked(tmp_path, name):
    store = secrets.SecretStore(tmp_path, backend=FakeKeyring())
    with pytest.raises(ValueError):
        store.get(name)
    with pytest.raises(ValueError):
        store.set(name, "v")


# ====================================================================== links
@pytest.mark.parametrize(
    "link",
    [
        links.JoinLink(code="47-8203-1956"),
        links.JoinLink(code="47-8203-1956", master="192.168.1.20:7733"),
        links.JoinLink(code="47-8203-1956", master="pc.example.org:443", group="Friends & Family / 100% ✓"),
        links.JoinLink(code="10-0000-0000", master="[fe80::1]:7733", group="a=b&c=d?#"),
        links.JoinLink(code="99-9999-9999", group="  spaced  "),
    ],
)
def test_link_round_trip(link):
    url = links.build_link(link)
    assert url.startswith("molink://join?code=")
    assert " " not in url and "&c=" not in url and "#" not in url
    assert links.parse_link(url) == link


def test_link_normalises_and_accepts_variants():
    want = links.JoinLink(code="47-8203-1956", master="192.168.1.20:7733")
    for url in [
        "molink://join?code=4782031956&master=192.168.1.20:7733",
        "MOLINK://JOIN/?code=47+8203+1956&master=192.168.1.20%3A7733",
        "  molink:join?code=47-8203-1956&master=192.168.1.20:7733&future=1  ",
    ]:
        assert links.parse_link(url) == want
    link = links.parse_link("molink://join?code=47-8203-1956&master=PC.Example.org:7733")
    assert link.master == "pc.example.org:7733" and (link.host, link.port) == ("pc.example.org", 7733)
    v6 = links.parse_link("molink://join?code=47-8203-1956&master=[FE80:0:0::1]:80")
    assert (v6.master, v6.host, v6.port) == ("[fe80::1]:80", "fe80::1", 80)


@pytest.mark.parametrize(
    "url, words",
    [
        ("https://join?code=4782031956", "molink://"),
        ("molink://leave?code=4782031956", "only join"),
        ("molink://join/extra?code=4782031956", "only join"),
        ("molink://join", "no pairing code"),
        ("molink://join?code=", "no pairing code"),
        ("molink://join?code=12345", "not valid"),
        ("molink://join?code=07-8203-1956", "not valid"),
        ("molink://join?code=47-8203-195a", "not valid"),
        ("molink://join?code=47-8203-1956&code=47-8203-1957", "more than once"),
        ("molink://join?code=47-8203-1956&master=host", "master address"),
        ("molink://join?code=47-8203-1956&master=host:0", "master address"),
        ("molink://join?code=47-8203-1956&master=host:65536", "master address"),
        ("molink://join?code=47-8203-1956&master=999.1.1.1:80", "master address"),
        ("molink://join?code=47-8203-1956&master=[zz::1]:80", "master address"),
        ("molink://join?code=47-8203-1956&master=a_b.c:80", "master address"),
        ("molink://join?code=47-8203-1956&master=-bad.example:80", "master address"),
        ("molink://join?code=47-8203-1956&master=user@host:80", "master address"),
        ("molink://join?code=47-8203-1956&master=h%C3%A9:80", "master address"),
        ("molink://join?code=47-8203-1956&group=" + "x" * 65, "1 to 64"),
        ("molink://join?code=47-8203-1956&group=%0Aevil", "cannot be shown"),
        ("molink://join?code=47-8203-1956&group=%E2%80%AEevil", "cannot be shown"),
        ("molink://join?code=47-8203-1956&group=%FF", "not text"),
        ("molink://join?code=47-8203-1956\n", None),  # trailing newline stripped: fine
        ("molink://join?code=47-8203-1956\x00", "control"),
        ("molink://join?" + "&".join(f"k{i}=v" for i in range(30)) + "&code=4782031956", "too many"),
        ("molink://join?code=4782031956&pad=" + "x" * 3000, "too long"),
    ],
)
def test_hostile_links(url, words):
    if words is None:
        assert links.parse_link(url).code == "47-8203-1956"
        return
    with pytest.raises(ValueError) as e:
        links.parse_link(url)
    msg = str(e.value)
    assert words in msg and msg.endswith(".") and "\n" not in msg


def test_join_link_constructor_checks_fields():
    with pytest.raises(ValueError):
        links.JoinLink(code="nope")
    with pytest.raises(ValueError):
        links.JoinLink(code="47-8203-1956", master="nohost")
    assert links.JoinLink(code="47 8203 1956").code == "47-8203-1956"


# ====================================================================== auto-pause policy
BUSY = GpuLoad(utilization=95, foreign_processes=1, foreign_memory=2 << 30, fullscreen=False)
CLEAR = GpuLoad(utilization=10, foreign_processes=0, foreign_memory=0, fullscreen=False)
FULLSCREEN = GpuLoad(utilization=None, foreign_processes=0, foreign_memory=0, fullscreen=True)
OURS_ONLY = GpuLoad(utilization=100, foreign_processes=0, foreign_memory=0, fullscreen=False)


def run(policy: AutoPause, steps) -> list[Decision]:
    return [policy.update(load, t) for t, load in steps]


def test_busy_gpu_warns_then_pauses_then_resumes_with_hysteresis():
    p = AutoPause(threshold_util=60, warn_seconds=60, clear_seconds=180)
    got = run(p, [(0, CLEAR), (5, BUSY), (30, BUSY), (64, BUSY), (65, BUSY), (100, BUSY)])
    assert got == [Decision.NONE, Decision.WARN, Decision.NONE, Decision.NONE, Decision.PAUSE, Decision.NONE]
    assert p.paused and not p.warning
    # clear for 150 s, then busy again: the clear clock starts over (hysteresis)
    assert run(p, [(110, CLEAR), (260, CLEAR), (270, BUSY), (280, CLEAR), (459, CLEAR)]) == [Decision.NONE] * 5
    assert p.update(CLEAR, 460) is Decision.RESUME
    assert not p.paused
    assert p.update(CLEAR, 500) is Decision.NONE
    assert p.update(BUSY, 510) is Decision.WARN  # a new episode warns again


def test_short_burst_does_not_pause():
    p = AutoPause()
    assert run(p, [(0, BUSY), (30, CLEAR), (61, BUSY), (100, BUSY), (121, BUSY)]) == [
        Decision.WARN,
        Decision.NONE,
        Decision.WARN,
        Decision.NONE,
        Decision.PAUSE,
    ]


def test_keep_sharing_skips_this_episode_only():
    p = AutoPause(warn_seconds=60, clear_seconds=180)
    assert p.update(BUSY, 0) is Decision.WARN and p.warning
    p.keep_sharing(10)
    assert not p.warning
    steps = [(70, BUSY), (500, BUSY), (600, CLEAR), (650, BUSY), (700, CLEAR), (879, CLEAR)]
    assert run(p, steps) == [Decision.NONE] * 6
    assert p.update(CLEAR, 880) is Decision.NONE  # clear 180 s: the episode is over
    assert p.update(BUSY, 890) is Decision.WARN


def test_threshold_fullscreen_and_our_own_load():
    p = AutoPause(threshold_util=60)
    assert p.busy(GpuLoad(60, 1, 0, False)) and not p.busy(GpuLoad(59.9, 1, 0, False))
    assert not p.busy(OURS_ONLY) and not p.busy(GpuLoad(None, 3, 1 << 30, False))
    assert p.busy(FULLSCREEN)
    assert run(p, [(0, OURS_ONLY), (100, OURS_ONLY)]) == [Decision.NONE, Decision.NONE]
    assert run(p, [(200, FULLSCREEN), (260, FULLSCREEN)]) == [Decision.WARN, Decision.PAUSE]


def test_unknown_load_never_pauses_and_never_resumes():
    p = AutoPause()
    assert run(p, [(t, None) for t in range(0, 1000, 50)]) == [Decision.NONE] * 20
    assert p.update(BUSY, 1000) is Decision.WARN
    assert p.update(None, 1030) is Decision.NONE and not p.warning  # the pending warning is dropped
    assert p.update(BUSY, 1070) is Decision.WARN  # so busy again means a fresh 60 s warning
    assert p.update(BUSY, 1130) is Decision.PAUSE
    assert run(p, [(1200, CLEAR), (1300, None), (1400, CLEAR), (1579, CLEAR)]) == [Decision.NONE] * 4
    assert p.update(CLEAR, 1580) is Decision.RESUME  # unknown interrupted the clear time


def test_reset_forgets_the_episode():
    p = AutoPause()
    p.update(BUSY, 0)
    p.reset()
    assert p.update(BUSY, 100) is Decision.WARN


# ====================================================================== auto-pause probes
class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801  (pynvml's name)
    pass


def fake_nvml(gpus: list[dict], *, init_fails: bool = False, shutdowns: list | None = None) -> types.ModuleType:
    """A stand-in for pynvml: each GPU dict has name, total, free, cc, util, graphics, compute, broken."""
    m = types.ModuleType("pynvml")
    m.NVMLError, m.NVMLError_NotSupported = NVMLError, NVMLError_NotSupported

    def init():
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    def handle(i):
        if gpus[i].get("broken"):
            raise NVMLError("GPU is lost")
        return gpus[i]

    def procs(kind):
        def get(h):
            if h[kind] == "unsupported":
                raise NVMLError_NotSupported("not supported")
            return [types.SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in h[kind]]

        return get

    m.nvmlInit = init
    m.nvmlShutdown = lambda: shutdowns.append(1) if shutdowns is not None else None
    m.nvmlSystemGetDriverVersion = lambda: b"555.42.02"
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=h["total"], free=h["free"], used=h["total"] - h["free"]
    )
    m.nvmlDeviceGetCudaComputeCapability = lambda h: h["cc"]
    m.nvmlDeviceGetName = lambda h: h["name"]
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h["util"], memory=0)
    m.nvmlDeviceGetGraphicsRunningProcesses = procs("graphics")
    m.nvmlDeviceGetComputeRunningProcesses = procs("compute")
    return m


GPU_A = {
    "name": b"NVIDIA GeForce RTX 3060",
    "total": 12 << 30,
    "free": 11 << 30,
    "cc": (8, 6),
    "util": 80,
    "graphics": [(10, None), (20, None)],
    "compute": [(30, 1 << 30), (10, 5 << 30)],
}
GPU_B = {
    "name": "NVIDIA GeForce GTX 1080",
    "total": 8 << 30,
    "free": 8 << 30,
    "cc": (6, 1),
    "util": 5,
    "graphics": "unsupported",
    "compute": [(20, 256 << 20)],
}


def test_probe_gpu_load_counts_foreign_processes(monkeypatch):
    shut = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([GPU_A, GPU_B], shutdowns=shut))
    load = autopause.probe_gpu_load({10})
    assert load == GpuLoad(
        utilization=80.0, foreign_processes=2, foreign_memory=(1 << 30) + (256 << 20), fullscreen=False
    )
    assert shut == [1]
    assert autopause.probe_gpu_load({10, 20, 30}).foreign_processes == 0


def test_probe_gpu_load_unknown_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_fails=True))
    assert autopause.probe_gpu_load(set()) is None
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([GPU_A, {**GPU_B, "broken": True}]))
    assert autopause.probe_gpu_load(set()) is None  # an NVML error midway: unknown, not "clear"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the package is not installed
    assert autopause.probe_gpu_load(set()) is None
    # a fullscreen app is known without NVML
    monkeypatch.setattr(autopause, "fullscreen_app_running", lambda: True)
    assert autopause.probe_gpu_load(set()) == FULLSCREEN


def test_real_probe_on_this_machine_does_not_raise():
    load = autopause.probe_gpu_load({os.getpid()})
    assert load is None or isinstance(load, GpuLoad)
    if not sys.platform.startswith("win"):
        assert autopause.fullscreen_app_running() is False


class FakeShell32:
    def __init__(self, state: int, hr: int = 0, raises: bool = False):
        self.state, self.hr, self.raises = state, hr, raises

    def SHQueryUserNotificationState(self, ref):  # noqa: N802  (the Win32 name)
        if self.raises:
            raise OSError("no such function")
        ref._obj.value = self.state  # the c_int passed by reference
        return self.hr


def test_windows_fullscreen_states():
    assert winfull.fullscreen_app_running(FakeShell32(winfull.QUNS_RUNNING_D3D_FULL_SCREEN))
    assert winfull.fullscreen_app_running(FakeShell32(winfull.QUNS_BUSY))
    assert winfull.fullscreen_app_running(FakeShell32(winfull.QUNS_PRESENTATION_MODE))
    for s in (winfull.QUNS_NOT_PRESENT, winfull.QUNS_ACCEPTS_NOTIFICATIONS, winfull.QUNS_QUIET_TIME, winfull.QUNS_APP):
        assert not winfull.fullscreen_app_running(FakeShell32(s))
    assert winfull.notification_state(FakeShell32(3)) == 3
    assert winfull.notification_state(FakeShell32(3, hr=ctypes.c_long(0x80004005).value)) is None  # E_FAIL
    assert not winfull.fullscreen_app_running(FakeShell32(3, raises=True))
    if not sys.platform.startswith("win"):
        assert winfull.fullscreen_app_running() is False  # no windll: False, no exception


# ====================================================================== GPUs (worker_core.gpus)
def test_list_gpus_from_nvml(monkeypatch):
    from worker_core.gpus import GpuInfo, list_gpus

    shut = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([GPU_A, {**GPU_B, "broken": True}, GPU_B], shutdowns=shut))
    assert list_gpus() == [
        GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 << 30, 11 << 30, "8.6", "555.42.02"),
        GpuInfo(2, "NVIDIA GeForce GTX 1080", 8 << 30, 8 << 30, "6.1", "555.42.02"),
    ]
    assert shut == [1]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([GPU_A], init_fails=True))
    assert list_gpus() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert list_gpus() == []


def test_probe_uses_gpus_module():
    from worker_core import gpus, probe

    assert probe.nvidia_gpus is gpus.list_gpus and probe.Gpu is gpus.GpuInfo


def test_desktop_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import app.desktop.settings, app.desktop.system.secrets, app.desktop.system.autostart\n"
        "import app.desktop.system._windows_autostart, app.desktop.system.autostart_base\n"
        "import app.desktop.system.single_instance, app.group.links, app.desktop.system.autopause\n"
        "import app.desktop.system._windows_fullscreen\n"
        "import app.desktop.icons, worker_core.gpus\n"
        "worker_core.gpus.list_gpus(); app.desktop.system.autopause.probe_gpu_load(set())\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('heavy:', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "heavy: []"


# ====================================================================== autostart (XDG)
CMD = ["/opt/MoLink App/molink-tray", "--background"]


def test_xdg_autostart_write_read_remove(tmp_path):
    a = autostart.XdgAutostart(tmp_path, CMD)
    assert a.path == tmp_path / "autostart" / "molink.desktop"
    assert not a.is_enabled() and not a.blocked_by_user()
    a.set_enabled(True)
    assert a.is_enabled()
    e = autostart.read_desktop_entry(a.path.read_text())
    assert e["Type"] == "Application" and e["Name"] == "MoLink" and e["Terminal"] == "false" and e["Icon"] == "molink"
    assert e["X-GNOME-Autostart-enabled"] == "true"
    assert e["Exec"] == '"/opt/MoLink App/molink-tray" --background'
    assert autostart.parse_exec(e["Exec"]) == CMD
    a.set_enabled(False)
    assert not a.path.exists() and not a.is_enabled()
    a.set_enabled(False)  # already off: fine


@pytest.mark.parametrize("extra", ["Hidden=true", "X-GNOME-Autostart-enabled=false", "Hidden=True"])
def test_xdg_autostart_respects_the_desktops_off_switch(tmp_path, extra):
    a = autostart.XdgAutostart(tmp_path, CMD)
    a.set_enabled(True)
    text = a.path.read_text().replace("X-GNOME-Autostart-enabled=true\n", "")
    a.path.write_text(text + extra + "\n")
    assert not a.is_enabled() and a.blocked_by_user()
    # a key in another group does not count
    a.path.write_text(text + "[Desktop Action x]\n" + extra + "\n")
    assert a.is_enabled()


@pytest.mark.parametrize(
    "cmd",
    [
        ["/usr/bin/molink-tray"],
        ["/home/me/My Apps/molink", "--data", "/tmp/a b", "--name", "O'Brien"],
        ["/opt/x", 'say "hi"', "$HOME", "`id`", "back\\slash", "100%", "a;b|c&d", "tab\there".replace("\t", " ")],
    ],
)
def test_desktop_exec_quoting_round_trips(tmp_path, cmd):
    line = autostart.exec_line(cmd)
    assert autostart.parse_exec(line) == cmd
    assert "%" not in line.replace("%%", "")  # every percent sign doubled
    a = autostart.XdgAutostart(tmp_path, cmd)
    a.set_enabled(True)
    assert autostart.parse_exec(autostart.read_desktop_entry(a.path.read_text())["Exec"]) == cmd


def test_desktop_exec_quoting_follows_the_spec():
    # reserved characters quoted; inside quotes " ` $ \ get a backslash; then string escaping doubles backslashes
    assert autostart.exec_line(["/a b", "x\\y"]) == '"/a b" "x\\\\\\\\y"'
    assert autostart.exec_line(["/bin/sh", "$X"]) == '/bin/sh "\\\\$X"'
    with pytest.raises(ValueError):
        autostart.exec_line(["/bin/x", "a\nb"])
    with pytest.raises(ValueError):
        autostart.XdgAutostart(Path("/nonexistent"), [])


def test_for_this_os_uses_xdg_config_home(tmp_path, monkeypatch):
    if sys.platform.startswith("win") or sys.platform == "darwin":
        pytest.skip("XDG only")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    a = autostart.for_this_os(CMD)
    assert isinstance(a, autostart.XdgAutostart) and a.path == tmp_path / "autostart" / "molink.desktop"
    assert not a.is_enabled()


# ====================================================================== autostart (Windows, faked registry)
class FakeWinreg:
    HKEY_CURRENT_USER = "HKCU"
    KEY_READ, KEY_SET_VALUE, REG_SZ, REG_BINARY = 0x20019, 0x0002, 1, 3

    def __init__(self):
        self.keys: dict[str, dict[str, tuple[object, int]]] = {}
        self.writes: list[tuple[str, str]] = []
        self.open_handles = 0

    class Handle:
        def __init__(self, path, access):
            self.path, self.access = path, access

    def OpenKey(self, root, sub, reserved=0, access=0x20019):  # noqa: N802
        assert root == "HKCU"
        if sub not in self.keys:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        self.open_handles += 1
        return self.Handle(sub, access)

    def CreateKeyEx(self, root, sub, reserved=0, access=0x20019):  # noqa: N802
        self.keys.setdefault(sub, {})
        self.open_handles += 1
        return self.Handle(sub, access)

    def QueryValueEx(self, h, name):  # noqa: N802
        if name not in self.keys[h.path]:
            raise FileNotFoundError(2, "value not found")
        return self.keys[h.path][name]

    def SetValueEx(self, h, name, reserved, typ, value):  # noqa: N802
        assert h.access & self.KEY_SET_VALUE
        self.keys[h.path][name] = (value, typ)
        self.writes.append((h.path, name))

    def DeleteValue(self, h, name):  # noqa: N802
        assert h.access & self.KEY_SET_VALUE
        if name not in self.keys[h.path]:
            raise FileNotFoundError(2, "value not found")
        del self.keys[h.path][name]
        self.writes.append((h.path, name))

    def CloseKey(self, h):  # noqa: N802
        self.open_handles -= 1


WIN_CMD = [r"C:\Users\Zoë\AppData\Local\Programs\MoLink\molink-tray.exe", "--background"]


def test_windows_run_key_write_read_remove():
    reg = FakeWinreg()
    a = winauto.WindowsRunKey(WIN_CMD, reg)
    assert not a.is_enabled()  # no Run key at all
    a.set_enabled(False)  # nothing to remove: fine
    a.set_enabled(True)
    assert reg.keys[winauto.RUN_KEY]["MoLink"] == (f'"{WIN_CMD[0]}" --background', reg.REG_SZ)
    assert a.is_enabled() and not a.blocked_by_user()
    a.set_enabled(False)
    assert "MoLink" not in reg.keys[winauto.RUN_KEY] and not a.is_enabled()
    assert reg.open_handles == 0  # every key closed


@pytest.mark.parametrize(
    "approved, enabled",
    [
        (bytes([2]) + bytes(11), True),
        (bytes([6]) + bytes(11), True),
        (bytes([3]) + bytes(range(11)), False),
        (bytes([1]) + bytes(11), False),
        (b"", True),
        ("weird", True),
    ],
)
def test_windows_startup_approved_is_respected_and_never_rewritten(approved, enabled):
    reg = FakeWinreg()
    a = winauto.WindowsRunKey(WIN_CMD, reg)
    a.set_enabled(True)
    reg.keys[winauto.APPROVED_KEY] = {"MoLink": (approved, reg.REG_BINARY)}
    assert a.is_enabled() is enabled and a.blocked_by_user() is (not enabled)
    a.set_enabled(True)  # the user ticks "start at login" again: Run is rewritten, StartupApproved is not
    assert a.is_enabled() is enabled
    assert reg.keys[winauto.APPROVED_KEY]["MoLink"] == (approved, reg.REG_BINARY)
    assert all(path == winauto.RUN_KEY for path, _ in reg.writes)
    assert reg.open_handles == 0


def test_windows_command_line_quoting():
    exe = r"C:\Program Files\MoLink\molink-tray.exe"
    assert winauto.command_line([exe]) == f'"{exe}"'
    line = winauto.command_line([r"C:\m.exe", "--data", r"D:\My Data", 'say "x"'])
    assert line == r'"C:\m.exe" --data "D:\My Data" "say \"x\""'
    for bad in ([], [""], ['C:\\a"b.exe'], [r"C:\m.exe", "a\nb"]):
        with pytest.raises(ValueError):
            winauto.command_line(bad)


def test_windows_job_object_with_a_fake_kernel32():
    from app.desktop.system._windows_job import JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, ChildJob

    class K32:
        def __init__(self, assign_ok=True):
            self.calls, self.assign_ok, self.flags = [], assign_ok, None

        def CreateJobObjectW(self, a, b):
            return 77

        def SetInformationJobObject(self, handle, cls, info, size):
            self.flags = info._obj.BasicLimitInformation.LimitFlags
            return 1

        def OpenProcess(self, access, inherit, pid):
            self.calls.append(("open", pid))
            return 5 if pid > 0 else 0

        def AssignProcessToJobObject(self, job, process):
            self.calls.append(("assign", job, process))
            return self.assign_ok

        def CloseHandle(self, h):
            self.calls.append(("close", h))

    k = K32()
    job = ChildJob(k)
    assert k.flags == JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    assert job.add(1234) and k.calls == [("open", 1234), ("assign", 77, 5), ("close", 5)]
    assert not job.add(0)  # a process that cannot be opened: False, no exception
    assert not ChildJob(K32(assign_ok=False)).add(1)
