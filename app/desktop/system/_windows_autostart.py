"""Windows only: start MoLink at login through the current user's ``Run`` registry key.

Contract
--------
``WindowsRunKey(command, registry)``: ``registry`` is the ``winreg`` module or a fake with the same
functions (``OpenKey``, ``CreateKeyEx``, ``QueryValueEx``, ``SetValueEx``, ``DeleteValue``,
``CloseKey`` and the constants ``HKEY_CURRENT_USER``, ``KEY_READ``, ``KEY_SET_VALUE``, ``REG_SZ``).

* ``set_enabled(True)`` writes ``HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run`` value
  ``MoLink`` = the command line (executable always in double quotes, other arguments quoted the way
  the C runtime parses them); ``set_enabled(False)`` deletes that value (a missing value is fine).
* ``is_enabled()`` is True when the ``Run`` value exists and the user has not turned it off in Task
  Manager / Settings > Apps > Startup, which writes ``...\\Explorer\\StartupApproved\\Run`` value
  ``MoLink`` (REG_BINARY; first byte even, e.g. ``02`` or ``06`` = enabled, odd, e.g. ``03`` = disabled)
  without touching ``Run``.  ``blocked_by_user()`` reports that case.
* This module never writes ``StartupApproved``: a user's "disabled" stays until the user changes it
  there (the app says where).  Windows' own UI is the only place that re-enables it.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any

from .autostart_base import Autostart

log = logging.getLogger("molink.autostart")

RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
APPROVED_KEY = r"Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run"
VALUE_NAME = "MoLink"


def command_line(command: list[str]) -> str:
    """``"C:\\...\\molink-tray.exe" --background``: the executable always quoted, the rest as CreateProcess parses."""
    if not command:
        raise ValueError("the autostart command is empty")
    exe, *rest = command
    if not exe or '"' in exe or any(ord(ch) < 0x20 for ch in exe):
        raise ValueError(f"not a usable executable path: {exe!r}")
    if any(any(ord(ch) < 0x20 for ch in a) for a in rest):
        raise ValueError("an autostart argument cannot contain control characters")
    return f'"{exe}"' + (" " + subprocess.list2cmdline(rest) if rest else "")


def approved_disabled(data: object) -> bool:
    """True if a ``StartupApproved`` value says the user disabled the entry (odd first byte)."""
    if isinstance(data, (bytes, bytearray)) and len(data) > 0:
        return data[0] % 2 == 1
    return False  # missing or of an unexpected type: Windows treats the entry as enabled


class WindowsRunKey(Autostart):
    def __init__(self, command: list[str], registry: Any) -> None:
        self.command = list(command)
        self.line = command_line(self.command)
        self.reg = registry

    def _read(self, subkey: str) -> object | None:
        try:
            key = self.reg.OpenKey(self.reg.HKEY_CURRENT_USER, subkey, 0, self.reg.KEY_READ)
        except FileNotFoundError:
            return None
        try:
            value, _type = self.reg.QueryValueEx(key, VALUE_NAME)
            return value
        except FileNotFoundError:
            return None
        finally:
            self.reg.CloseKey(key)

    def run_value(self) -> str | None:
        """The command line in our ``Run`` value, or None."""
        v = self._read(RUN_KEY)
        return v if isinstance(v, str) and v.strip() else None

    def blocked_by_user(self) -> bool:
        return self.run_value() is not None and approved_disabled(self._read(APPROVED_KEY))

    def is_enabled(self) -> bool:
        return self.run_value() is not None and not approved_disabled(self._read(APPROVED_KEY))

    def set_enabled(self, on: bool) -> None:
        if on:
            key = self.reg.CreateKeyEx(self.reg.HKEY_CURRENT_USER, RUN_KEY, 0, self.reg.KEY_SET_VALUE)
            try:
                self.reg.SetValueEx(key, VALUE_NAME, 0, self.reg.REG_SZ, self.line)
            finally:
                self.reg.CloseKey(key)
            if self.blocked_by_user():
                log.info(
                    "MoLink's login entry is turned off in Task Manager; it stays off until the user turns it on there"
                )
            return
        try:
            key = self.reg.OpenKey(self.reg.HKEY_CURRENT_USER, RUN_KEY, 0, self.reg.KEY_SET_VALUE)
        except FileNotFoundError:
            return
        try:
            self.reg.DeleteValue(key, VALUE_NAME)
        except FileNotFoundError:
            pass
        finally:
            self.reg.CloseKey(key)
