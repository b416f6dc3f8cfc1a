"""Windows: one inbound firewall rule for the app's own listening ports, asked once, kept up to date.

Contract
--------
Windows blocks inbound connections to a port nobody allowed, even one the router maps; its own
prompt appears on the first listen, names "Python" and, dismissed, leaves a block rule behind.
So the app asks, in its own words, and writes one *port* rule (not a program rule: in a venv
the listening process is the base interpreter) on the private profile, named
:data:`RULE_NAME`, listing every port of the app that listens beyond this PC.  Nothing here is
ever done silently (DESKTOP.md §8.4).

* :func:`inbound_ports` (pure): those ports, sorted: the group port of a group hosted here, the
  port of the relay this PC runs, the worker's hop port when its worker listens (the desktop's
  workers only dial on Windows, so it passes none); none when they listen on loopback alone.
* :func:`decide` (pure): on Windows, nothing while every needed port was already asked about
  (the settings keep those ports, whatever the answer); else ``ASK`` (never asked, or declined:
  a new port asks again), or ``UPDATE`` when the user allowed the rule before (the rule is then
  rewritten without asking again: the UAC prompt is the only question).  A port the rule covers
  and nothing uses any more stays in it until the next rewrite (no prompt just to close a port
  nobody listens on).
* :func:`rule_script`, :func:`elevated_argv`, :func:`show_argv` (pure): the command lines.  One
  elevated PowerShell (``-EncodedCommand``: no quoting to get wrong) deletes the rule and the one
  older versions named :data:`LEGACY_RULE_NAME` (the group port alone), then adds the rule with
  every port.
* :func:`write_rule` (Windows only): that script run elevated (one UAC prompt, through
  ``Start-Process -Verb RunAs -Wait``, bounded by ``ELEVATED_TIMEOUT``), checked with
  :func:`has_rule` (no elevation), then recorded: ``HKCU\\Software\\MoLink`` value
  :data:`REGISTRY_VALUE` (the ports, text); the older DWORD value goes.  The uninstaller removes
  the rule only when a record exists (so nobody who never allowed one sees a UAC prompt when
  uninstalling).  ``run`` and ``registry`` are injectable for tests.

Not run on Windows here (no Windows machine): the command lines and decisions are tested, the
calls are not.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import subprocess
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

RULE_NAME = "MoLink"
LEGACY_RULE_NAME = "MoLink group port"  # the group port alone (before 2026-12-05)
REGISTRY_KEY = r"Software\MoLink"
REGISTRY_VALUE = "FirewallRulePorts"  # REG_SZ "7733,7735"
LEGACY_REGISTRY_VALUE = "FirewallRulePort"  # REG_DWORD, the one port of LEGACY_RULE_NAME
ELEVATED_TIMEOUT = 180.0  # seconds for the user to answer the UAC prompt and netsh to finish
MAX_PORTS = 8  # a sanity bound on what the settings keep
QUESTION = (
    "Friends on other PCs reach MoLink on this PC through TCP {ports}. Windows Firewall blocks {them} until "
    "allowed. Allow {them} on private networks? (Windows asks for permission once.)"
)
UPDATED = "Windows Firewall now lets friends reach MoLink on TCP {ports}."


class Action(enum.Enum):
    NONE = "none"
    ASK = "ask"  # the question, then the rule (one UAC prompt)
    UPDATE = "update"  # allowed before: rewrite the rule (one UAC prompt, no question)


def _port(p: object) -> TypeGuard[int]:
    return isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536


def inbound_ports(
    host: str, group_port: object = None, relay_port: object = None, hop_port: object = None
) -> tuple[int, ...]:
    """The app's ports that listen beyond this PC (``host``: the address they bind), sorted."""
    if host not in ("0.0.0.0", "::", ""):
        return ()  # loopback or one address the user chose: nothing the firewall needs to let in from outside
    return tuple(sorted({p for p in (group_port, relay_port, hop_port) if _port(p)}))


def decide(platform: str, needed: Iterable[int], asked: Iterable[int], allowed: bool | None) -> Action:
    """What to do about the rule (see the module contract)."""
    need = set(needed)
    if platform != "win32" or not need or need <= set(asked):
        return Action.NONE
    return Action.UPDATE if allowed else Action.ASK


def describe(ports: Iterable[int]) -> str:
    """ "port 7733" / "ports 7733 and 7735" / "ports 7733, 7734 and 7735"."""
    ps = [str(p) for p in sorted(ports)]
    if len(ps) == 1:
        return f"port {ps[0]}"
    return f"ports {', '.join(ps[:-1])} and {ps[-1]}"


def question(ports: Iterable[int]) -> str:
    ps = sorted(ports)
    return QUESTION.format(ports=describe(ps), them="it" if len(ps) == 1 else "them")


def add_argv(ports: Iterable[int]) -> list[str]:
    return [
        "netsh", "advfirewall", "firewall", "add", "rule", f"name={RULE_NAME}", "dir=in", "action=allow",
        "protocol=TCP", "localport=" + ",".join(str(p) for p in sorted(ports)), "profile=private",
    ]  # fmt: skip


def delete_argv(name: str = RULE_NAME) -> list[str]:
    return ["netsh", "advfirewall", "firewall", "delete", "rule", f"name={name}"]


def show_argv() -> list[str]:
    return ["netsh", "advfirewall", "firewall", "show", "rule", f"name={RULE_NAME}"]


def _ps(argv: list[str]) -> str:
    """``argv`` as a PowerShell command (each argument single-quoted)."""
    return "& " + " ".join("'" + a.replace("'", "''") + "'" for a in argv)


def rule_script(ports: Iterable[int]) -> str:
    """The elevated PowerShell: both rule names deleted (absent is fine), the rule added; its exit code is the add's."""
    return "\n".join(
        [
            _ps(delete_argv(LEGACY_RULE_NAME)) + " | Out-Null",
            _ps(delete_argv(RULE_NAME)) + " | Out-Null",
            _ps(add_argv(ports)),
            "exit $LASTEXITCODE",
        ]
    )


def elevated_argv(script: str) -> list[str]:
    """``script`` (PowerShell) run elevated and waited for, its exit code passed on."""
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    inner = ",".join(f"'{a}'" for a in ("-NoProfile", "-NonInteractive", "-EncodedCommand", encoded))
    outer = (
        f"$p = Start-Process -FilePath 'powershell.exe' -ArgumentList {inner} -Verb RunAs -Wait -PassThru "
        "-WindowStyle Hidden; exit $p.ExitCode"
    )
    return ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command", outer]


def has_rule(run: Callable[..., Any] = subprocess.run) -> bool:
    """Whether the rule exists (``netsh ... show rule`` exits 0)."""
    try:
        return run(show_argv(), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def write_rule(ports: Iterable[int], run: Callable[..., Any] = subprocess.run, registry: Any = None) -> str:
    """Write the rule for ``ports`` (one UAC prompt) and record it for the uninstaller; returns ""
    on success, else why not, in one sentence.  Blocks until the user answered: call it off the
    Qt thread."""
    ps = sorted(set(ports))
    if not ps or len(ps) > MAX_PORTS or not all(_port(p) for p in ps):
        return f"the firewall rule was not written (ports {ps[: MAX_PORTS + 1]} make no sense)"
    try:
        run(elevated_argv(rule_script(ps)), capture_output=True, timeout=ELEVATED_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the firewall rule was not written ({type(e).__name__})"
    if not has_rule(run):
        return "the firewall rule was not written (permission refused?)"
    if registry is None:
        import winreg as registry  # Windows only
    key = registry.CreateKeyEx(registry.HKEY_CURRENT_USER, REGISTRY_KEY, 0, registry.KEY_SET_VALUE)
    try:
        registry.SetValueEx(key, REGISTRY_VALUE, 0, registry.REG_SZ, ",".join(map(str, ps)))
        with contextlib.suppress(OSError):  # an older version's record (absent: nothing to drop)
            registry.DeleteValue(key, LEGACY_REGISTRY_VALUE)
    finally:
        registry.CloseKey(key)
    return ""
