"""The Windows firewall rule for the app's inbound ports: which ports, when it is asked or
rewritten, the command lines, what is recorded for the uninstaller.  The calls themselves were
not run on Windows (none here)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.desktop.system import firewall
from app.desktop.system.firewall import Action

ROOT = Path(__file__).resolve().parents[1]


def test_the_ports_are_the_apps_own_that_listen_beyond_this_pc():
    assert firewall.inbound_ports("::", 7733) == (7733,)
    assert firewall.inbound_ports("0.0.0.0", 7733, 7735) == (7733, 7735)  # the relay this PC runs
    assert firewall.inbound_ports("", 7735, 7733, 7734) == (7733, 7734, 7735)  # a listening worker's hop port
    assert firewall.inbound_ports("::", None, 7735) == (7735,)  # a relay without a group
    assert firewall.inbound_ports("::", 7733, 7733) == (7733,)
    assert firewall.inbound_ports("127.0.0.1", 7733, 7735) == ()  # nobody outside can reach them anyway
    assert firewall.inbound_ports("::", 0, 70000, True) == ()  # nonsense is no port


def test_asked_once_then_rewritten_when_the_set_grows():
    assert firewall.decide("win32", (7733,), (), None) is Action.ASK
    assert firewall.decide("linux", (7733,), (), None) is Action.NONE
    assert firewall.decide("win32", (), (), None) is Action.NONE
    assert firewall.decide("win32", (7733,), (7733,), False) is Action.NONE  # declined: not asked twice
    assert firewall.decide("win32", (7733,), (7733, 7735), True) is Action.NONE  # covered (the relay stopped)
    assert firewall.decide("win32", (7733, 7735), (7733,), True) is Action.UPDATE  # allowed: rewritten, unasked
    assert firewall.decide("win32", (7733, 7735), (7733,), False) is Action.ASK  # declined, but a new port
    assert firewall.question([7735, 7733]).startswith("Friends on other PCs reach MoLink on this PC through TCP "
                                                      "ports 7733 and 7735. Windows Firewall blocks them")  # fmt: skip
    assert "TCP port 7733. Windows Firewall blocks it until allowed. Allow it" in firewall.question([7733])


def _decoded(argv: list[str]) -> str:
    """The script an elevated_argv runs."""
    outer = argv[4]
    encoded = outer.split("'-EncodedCommand','")[1].split("'")[0]
    return base64.b64decode(encoded).decode("utf-16-le")


def test_command_lines():
    assert firewall.add_argv([7735, 7733]) == [
        "netsh", "advfirewall", "firewall", "add", "rule", "name=MoLink", "dir=in", "action=allow",
        "protocol=TCP", "localport=7733,7735", "profile=private",
    ]  # fmt: skip
    assert firewall.show_argv()[-1] == firewall.delete_argv()[-1] == "name=MoLink"
    script = firewall.rule_script([7733, 7735])
    assert script.splitlines() == [
        "& 'netsh' 'advfirewall' 'firewall' 'delete' 'rule' 'name=MoLink group port' | Out-Null",
        "& 'netsh' 'advfirewall' 'firewall' 'delete' 'rule' 'name=MoLink' | Out-Null",
        "& 'netsh' 'advfirewall' 'firewall' 'add' 'rule' 'name=MoLink' 'dir=in' 'action=allow' 'protocol=TCP' "
        "'localport=7733,7735' 'profile=private'",
        "exit $LASTEXITCODE",
    ]
    elevated = firewall.elevated_argv(script)
    assert elevated[:4] == ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command"]
    assert "-Verb RunAs -Wait -PassThru" in elevated[4] and "exit $p.ExitCode" in elevated[4]
    assert _decoded(elevated) == script  # one elevation runs all three, with no quoting of its own
    assert "'" not in elevated[4].split("'-EncodedCommand','")[1].rstrip("'").split("'")[0]


class FakeRegistry:
    HKEY_CURRENT_USER, KEY_SET_VALUE, REG_SZ = "HKCU", 2, 1

    def __init__(self, values: dict | None = None) -> None:
        self.values: dict[tuple[str, str], object] = dict(values or {})

    def CreateKeyEx(self, root, sub, reserved, access):  # noqa: N802 - winreg's names
        return (root, sub)

    def SetValueEx(self, key, name, reserved, kind, value):  # noqa: N802
        assert kind == self.REG_SZ
        self.values[(key[1], name)] = value

    def DeleteValue(self, key, name):  # noqa: N802
        if (key[1], name) not in self.values:
            raise FileNotFoundError(name)
        del self.values[(key[1], name)]

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


def test_a_rule_written_is_checked_and_recorded_for_the_uninstaller():
    calls: list = []
    older = {(firewall.REGISTRY_KEY, firewall.LEGACY_REGISTRY_VALUE): 7733}  # an older version's record
    reg = FakeRegistry(older)
    assert firewall.write_rule([7735, 7733], _run(calls=calls), reg) == ""
    assert calls[0][0] == "powershell.exe" and _decoded(calls[0]) == firewall.rule_script([7733, 7735])
    assert calls[1] == firewall.show_argv()
    assert reg.values == {(firewall.REGISTRY_KEY, firewall.REGISTRY_VALUE): "7733,7735"}
    assert firewall.write_rule([7733], _run(), reg) == ""  # no older record: nothing to drop, no error


@pytest.mark.parametrize(
    "run",
    [_run(show_code=1), _run(error=OSError), _run(error=subprocess.TimeoutExpired)],
    ids=["refused", "no shell", "timeout"],
)
def test_a_rule_refused_or_failed_is_a_sentence_and_nothing_is_recorded(run):
    reg = FakeRegistry()
    assert firewall.write_rule([7733], run, reg).startswith("the firewall rule was not written") and reg.values == {}


def test_nonsense_ports_write_nothing():
    calls: list = []
    for bad in ([], [0], [70000], list(range(1000, 1010))):
        assert "make no sense" in firewall.write_rule(bad, _run(calls=calls), FakeRegistry())
    assert calls == []


def test_the_uninstaller_removes_the_rule_and_the_older_one_only_when_the_app_recorded_one():
    iss = (ROOT / "installer" / "windows" / "molink.iss").read_text()
    for name in (firewall.RULE_NAME, firewall.LEGACY_RULE_NAME):
        assert f'delete rule name="{name}"' in iss
    for value in (firewall.REGISTRY_VALUE, firewall.LEGACY_REGISTRY_VALUE):
        assert f"'{value}'" in iss and f"RegDeleteValue(HKCU, AppKey, '{value}')" in iss
    assert "RegQueryStringValue(HKCU, AppKey, 'FirewallRulePorts'" in iss and "AppKey = 'Software\\MoLink'" in iss
    assert firewall.REGISTRY_KEY == "Software\\MoLink"
