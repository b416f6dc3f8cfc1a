"""Windows: an inbound firewall rule for the group port, added once, with the user's consent.

Contract
--------
Windows blocks inbound connections to a port nobody allowed, even one the router maps; its own
prompt appears on the first listen, names "Python" and, dismissed, leaves a block rule behind.
So the app asks once, in its own words, when a group starts on this PC, and adds a *port* rule
(not a program rule: in a venv the listening process is the base interpreter) on the private
profile, named :data:`RULE_NAME`.  Nothing here is ever done silently (DESKTOP.md §8.4).

* :func:`wanted` (pure): whether to ask: on Windows, for a group port on every interface that
  has not been asked about (the settings keep the last port asked, whatever the answer).
* :func:`add_argv` / :func:`delete_argv` / :func:`show_argv` (pure): the ``netsh`` command lines.
* :func:`add_rule` (Windows only): ``netsh`` run elevated (one UAC prompt, through PowerShell's
  ``Start-Process -Verb RunAs -Wait``, bounded by ``ELEVATED_TIMEOUT``), then checked with
  :func:`has_rule` (no elevation needed); on success ``HKCU\\Software\\MoLink`` value
  ``FirewallRulePort`` records it, and only then does the uninstaller remove the rule (so nobody
  who never allowed one sees a UAC prompt when uninstalling).  ``run`` and ``registry`` are
  injectable for tests.

Not run on Windows here (no Windows machine): the command lines are tested, the calls are not.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

RULE_NAME = "MoLink group port"
REGISTRY_KEY = r"Software\MoLink"
REGISTRY_VALUE = "FirewallRulePort"
ELEVATED_TIMEOUT = 180.0  # seconds for the user to answer the UAC prompt and netsh to finish
QUESTION = (
    "Friends on other PCs join this group through TCP port {port}. Windows Firewall blocks it until it is "
    "allowed. Allow it on private networks? (Windows asks for permission once.)"
)


def wanted(platform: str, port: object, asked_port: int | None, host: str) -> bool:
    """Whether to offer the rule: Windows, a valid group port listening beyond this PC, not yet asked."""
    listens_out = host in ("0.0.0.0", "::", "")
    return platform == "win32" and isinstance(port, int) and 0 < port < 65536 and port != asked_port and listens_out


def add_argv(port: int) -> list[str]:
    return [
        "netsh", "advfirewall", "firewall", "add", "rule", f"name={RULE_NAME}", "dir=in", "action=allow",
        "protocol=TCP", f"localport={port}", "profile=private",
    ]  # fmt: skip


def delete_argv() -> list[str]:
    return ["netsh", "advfirewall", "firewall", "delete", "rule", f"name={RULE_NAME}"]


def show_argv() -> list[str]:
    return ["netsh", "advfirewall", "firewall", "show", "rule", f"name={RULE_NAME}"]


def elevated_argv(argv: list[str]) -> list[str]:
    """``argv`` (a netsh command line) run elevated and waited for, its exit code passed on."""
    program, *args = argv
    quoted = ",".join("'" + a.replace("'", "''") + "'" for a in args)
    script = (
        f"$p = Start-Process -FilePath '{program}' -ArgumentList {quoted} -Verb RunAs -Wait -PassThru "
        "-WindowStyle Hidden; exit $p.ExitCode"
    )
    return ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command", script]


def has_rule(run: Callable[..., Any] = subprocess.run) -> bool:
    """Whether the rule exists (``netsh ... show rule`` exits 0)."""
    try:
        return run(show_argv(), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def add_rule(port: int, run: Callable[..., Any] = subprocess.run, registry: Any = None) -> str:
    """Add the rule (one UAC prompt) and record it for the uninstaller; returns "" on success,
    else why not, in one sentence.  Blocks until the user answered: call it off the Qt thread."""
    try:
        run(elevated_argv(add_argv(port)), capture_output=True, timeout=ELEVATED_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the firewall rule was not added ({type(e).__name__})"
    if not has_rule(run):
        return "the firewall rule was not added (permission refused?)"
    if registry is None:
        import winreg as registry  # Windows only
    key = registry.CreateKeyEx(registry.HKEY_CURRENT_USER, REGISTRY_KEY, 0, registry.KEY_SET_VALUE)
    try:
        registry.SetValueEx(key, REGISTRY_VALUE, 0, registry.REG_DWORD, port)
    finally:
        registry.CloseKey(key)
    return ""
