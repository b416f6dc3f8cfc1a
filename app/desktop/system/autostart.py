"""Start MoLink at login: opt-in, and the OS's own on/off switch is respected.

Contract
--------
* :class:`~app.desktop.system.autostart_base.Autostart` is the interface: ``is_enabled()`` reads the
  OS state (the truth; the app's ``Settings.start_at_login`` only mirrors it) and ``set_enabled(on)``
  creates or removes the entry.
  Nothing here is called at install or upgrade time: only a user's choice creates an entry.
* :class:`XdgAutostart` (Linux and other XDG desktops) writes ``$XDG_CONFIG_HOME/autostart/molink.desktop``
  and removes it when turned off.  An entry the desktop's own settings turned off (``Hidden=true`` or
  ``X-GNOME-Autostart-enabled=false``) reads as disabled.  ``Exec`` is quoted per the Desktop Entry
  spec (reserved characters in double quotes, ``"`$\\`` backslash-escaped, ``%`` doubled, then the
  string-value escaping of backslashes).
* :class:`app.desktop.system._windows_autostart.WindowsRunKey` is the Windows one (HKCU ``...\\Run``).
* :func:`for_this_os` picks one for this OS; elsewhere (macOS) :class:`Unsupported`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .autostart_base import Autostart

log = logging.getLogger("molink.autostart")

DESKTOP_FILE = "molink.desktop"
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")  # an argument with one of these is quoted (Desktop Entry spec)
_ESCAPED_IN_QUOTES = set('"`$\\')


class Unsupported(Autostart):
    """An OS where MoLink has no login entry yet: always off; turning on raises OSError."""

    def is_enabled(self) -> bool:
        return False

    def set_enabled(self, on: bool) -> None:
        if on:
            raise OSError("starting at login is not supported on this system yet")


def quote_exec_arg(arg: str) -> str:
    """One argument of a Desktop Entry ``Exec`` key, before string-value escaping."""
    if not arg or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in arg):
        raise ValueError(f"an autostart argument cannot be empty or contain control characters: {arg!r}")
    arg = arg.replace("%", "%%")  # field codes
    if not any(ch in _RESERVED for ch in arg):
        return arg
    return '"' + "".join("\\" + ch if ch in _ESCAPED_IN_QUOTES else ch for ch in arg) + '"'


def exec_line(command: list[str]) -> str:
    """The value of ``Exec=`` as written in the file (quoting, then escaping of backslashes)."""
    if not command:
        raise ValueError("the autostart command is empty")
    return " ".join(quote_exec_arg(a) for a in command).replace("\\", "\\\\")


def _unescape_string(value: str) -> str:
    out, i = [], 0
    table = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value) and value[i + 1] in table:
            out.append(table[value[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_exec(value: str) -> list[str]:
    """The argument list of an ``Exec=`` value as written by :func:`exec_line` (inverse, for tests and checks)."""
    text = _unescape_string(value)
    args: list[str] = []
    cur: list[str] | None = None  # the argument being read (None: between arguments)
    i, quoted = 0, False
    while i < len(text):
        ch = text[i]
        if quoted:
            assert cur is not None  # an opening quote starts an argument
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPED_IN_QUOTES:
                cur.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                quoted = False
            else:
                cur.append(ch)
        elif ch == '"':
            quoted, cur = True, cur if cur is not None else []
        elif ch == " ":
            if cur is not None:
                args.append("".join(cur))
            cur = None
        else:
            cur = cur if cur is not None else []
            cur.append(ch)
        i += 1
    if quoted:
        raise ValueError("unterminated quote in Exec")
    if cur is not None:
        args.append("".join(cur))
    return [a.replace("%%", "%") for a in args]


def read_desktop_entry(text: str) -> dict[str, str]:
    """The keys of the ``[Desktop Entry]`` group (raw values, comments and other groups skipped)."""
    entries: dict[str, str] = {}
    group = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1]
            continue
        if group == "Desktop Entry" and "=" in line:
            key, value = line.split("=", 1)
            entries.setdefault(key.strip(), value.strip())
    return entries


class XdgAutostart(Autostart):
    def __init__(self, config_home: Path, command: list[str]) -> None:
        self.path = Path(config_home) / "autostart" / DESKTOP_FILE
        self.command = list(command)
        exec_line(self.command)  # a bad command fails here, not at the user's click

    def _entries(self) -> dict[str, str] | None:
        try:
            return read_desktop_entry(self.path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            return None

    def is_enabled(self) -> bool:
        e = self._entries()
        if e is None:
            return False
        return not self._turned_off(e)

    def blocked_by_user(self) -> bool:
        e = self._entries()
        return e is not None and self._turned_off(e)

    @staticmethod
    def _turned_off(e: dict[str, str]) -> bool:
        return e.get("Hidden", "").lower() == "true" or e.get("X-GNOME-Autostart-enabled", "").lower() == "false"

    def content(self) -> str:
        return "\n".join(
            [
                "[Desktop Entry]",
                "Type=Application",
                "Name=MoLink",
                "Comment=Share this PC's GPU with your MoLink group",
                f"Exec={exec_line(self.command)}",
                "Icon=molink",
                "Terminal=false",
                "X-GNOME-Autostart-enabled=true",
                "",
            ]
        )

    def set_enabled(self, on: bool) -> None:
        if not on:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{DESKTOP_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(self.content(), encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def for_this_os(command: list[str]) -> Autostart:
    """The login entry for this OS that starts ``command`` (e.g. ``[exe, "--background"]``)."""
    if sys.platform.startswith("win"):
        import winreg  # Windows only

        from ._windows_autostart import WindowsRunKey

        return WindowsRunKey(command, winreg)
    if sys.platform == "darwin":
        return Unsupported()
    import platformdirs

    return XdgAutostart(platformdirs.user_config_path(), command)  # honours $XDG_CONFIG_HOME
