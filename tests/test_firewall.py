"""The Windows firewall rule for the group port: when it is offered, the command lines, what
is recorded for the uninstaller.  The calls themselves were not run on Windows (none here)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.desktop.system import firewall

ROOT = Path(__file__).resolve().parents[1]


def test_it_is_offered_once_per_port_on_windows_for_a_group_beyond_this_pc():
    assert firewall.wanted("win32", 7733, None, "0.0.0.0")
    assert not firewall.wanted("win32", 7733, 7733, "0.0.0.0")  # asked already, whatever the answer
    assert firewall.wanted("win32", 7800, 7733, "::")  # another port: asked again
    assert not firewall.wanted("win32", 7733, None, "127.0.0.1")  # nobody outside can reach it anyway
    assert not firewall.wanted("linux", 7733, None, "0.0.0.0")
    assert not firewall.wanted("win32", None, None, "0.0.0.0") and not firewall.wanted("win32", 70000, None, "")


def test_command_lines():
    assert firewall.add_argv(7733) == [
        "netsh", "advfirewall", "firewall", "add", "rule", "name=MoLink group port", "dir=in", "action=allow",
        "protocol=TCP", "localport=7733", "profile=private",
    ]  # fmt: skip
    assert firewall.delete_argv()[-1] == firewall.show_argv()[-1] == "name=MoLink group port"
    elevated = firewall.elevated_argv(firewall.add_argv(7733))
    assert elevated[:4] == ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command"]
    script = elevated[4]
    assert "-Verb RunAs -Wait -PassThru" in script and "exit $p.ExitCode" in script
    assert "'name=MoLink group port'" in script and "'localport=7733'" in script


class FakeRegistry:
    HKEY_CURRENT_USER, KEY_SET_VALUE, REG_DWORD = "HKCU", 2, 4

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], object] = {}

    def CreateKeyEx(self, root, sub, reserved, access):  # noqa: N802 - winreg's names
        return (root, sub)

    def SetValueEx(self, key, name, reserved, kind, value):  # noqa: N802
        assert kind == self.REG_DWORD
        self.values[(key[1], name)] = value

    def CloseKey(self, key):  # noqa: N802
        pass


def _run(show_code: int = 0, error: type[BaseException] | None = None, calls: list | None = None):
    """A fake subprocess.run: the elevated netsh raises ``error`` if given; ``show rule`` exits ``show_code``."""

    def run(argv, **kw):
        if calls is not None:
            calls.append(argv)
        if error is not None and argv[0] == "powershell.exe":
            raise error(argv, 1) if error is subprocess.TimeoutExpired else error("no powershell")
        return SimpleNamespace(returncode=show_code if argv[0] == "netsh" else 0)

    return run


def test_a_rule_added_is_checked_and_recorded_for_the_uninstaller():
    calls: list = []
    reg = FakeRegistry()
    assert firewall.add_rule(7733, _run(calls=calls), reg) == ""
    assert calls[0][0] == "powershell.exe" and calls[1] == firewall.show_argv()
    assert reg.values == {(firewall.REGISTRY_KEY, firewall.REGISTRY_VALUE): 7733}


@pytest.mark.parametrize(
    "run",
    [_run(show_code=1), _run(error=OSError), _run(error=subprocess.TimeoutExpired)],
    ids=["refused", "no shell", "timeout"],
)
def test_a_rule_refused_or_failed_is_a_sentence_and_nothing_is_recorded(run):
    reg = FakeRegistry()
    assert firewall.add_rule(7733, run, reg).startswith("the firewall rule was not added") and reg.values == {}


def test_the_uninstaller_removes_the_same_rule_only_when_the_app_recorded_it():
    iss = (ROOT / "installer" / "windows" / "molink.iss").read_text()
    assert f'delete rule name="{firewall.RULE_NAME}"' in iss
    assert f"'{firewall.REGISTRY_VALUE}'" in iss and "AppKey = 'Software\\MoLink'" in iss
    assert firewall.REGISTRY_KEY == "Software\\MoLink"
