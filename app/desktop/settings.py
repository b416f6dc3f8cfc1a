"""The tray app's settings file and its folders.

Contract
--------
* :class:`Settings` holds every user choice the tray remembers, each with its default beside it.
* :class:`Paths` names the app's folders: from ``platformdirs`` for "molink" (:meth:`Paths.default`)
  or all under one root (:meth:`Paths.under`, for tests and portable installs).
* :func:`load` parses ``config_dir/settings.json`` into a :class:`Settings` once: a missing file gives
  the defaults; a file that is not JSON, not an object, or has a field of the wrong type gives the
  defaults too, with a logged warning, and the bad file is kept beside it as ``settings.json.bad``.
  Unknown keys are ignored (a newer version may have written them).
* :func:`save` writes atomically (a temporary file in the same folder, then ``os.replace``) and retries
  a few times on ``PermissionError``: on Windows an antivirus or indexer briefly holds files it scans.

No Qt here; the file I/O is small and synchronous (the caller decides which thread runs it).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeGuard

from master_core.config import MasterConfig

log = logging.getLogger("molink.settings")

APP_NAME = "molink"
SETTINGS_FILE = "settings.json"
SAVE_ATTEMPTS = 5  # os.replace tries on PermissionError
SAVE_BACKOFF = 0.05  # seconds before the 2nd try; doubled each time (0.05 + 0.1 + 0.2 + 0.4 = 0.75 s at most)


@dataclass
class Settings:
    share_on_start: bool = False  # resume sharing at launch if it was on when the app quit
    memory_limit_gb: float | None = None  # GPU/RAM budget for the worker; None = all free memory
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ... as the worker's --device
    auto_pause: bool = False  # opt-in: pause while another program uses the GPU heavily or a fullscreen app runs
    start_at_login: bool = False  # mirrors the OS autostart entry; the OS state wins when they differ
    model: str = "default"  # last model chosen when creating a group
    group_name: str = ""  # last group name chosen when creating a group
    group_port: int = MasterConfig.group_port  # TCP port of a group hosted on this PC
    # address a hosted group listens on: every interface, or one (a VPN's, 127.0.0.1 in tests)
    group_host: str = MasterConfig.group_host
    chat_master: str = ""  # host:port of a remote master for the chat window; "" = this PC's master
    paused_until: float | None = None  # epoch seconds the pause ends; math.inf = until the user resumes
    first_run_done: bool = False  # the first-run wizard was completed
    # Windows: the app's inbound ports last asked about for the firewall rule, whatever the answer (a new one asks
    # again), and the answer: None never asked, True allowed (later changes rewrite the rule unasked), False declined
    firewall_ports: list[int] = field(default_factory=list)
    firewall_allowed: bool | None = None
    relay: str = ""  # HOST:PORT of a relay (molink relay) a hosted group registers at and joining uses; "" = none
    run_relay: bool = False  # this PC offers a relay (molink relay) for groups; started again at launch
    relay_port: int = 7735  # the port that relay listens on


@dataclass(frozen=True)
class Paths:
    config_dir: Path  # settings.json, fallback secrets
    data_dir: Path  # the worker's and master's state
    logs_dir: Path  # the tray's and children's logs

    @property
    def master_dir(self) -> Path:
        return self.data_dir / "master"

    @property
    def worker_dir(self) -> Path:
        return self.data_dir / "worker"

    @property
    def settings_file(self) -> Path:
        return self.config_dir / SETTINGS_FILE

    @classmethod
    def default(cls) -> Paths:
        """The per-user folders of this OS (Windows: ``%LOCALAPPDATA%\\molink``; Linux: XDG folders)."""
        import platformdirs

        return cls(
            config_dir=Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
            data_dir=Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
            logs_dir=Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
        )

    @classmethod
    def under(cls, root: Path) -> Paths:
        """Everything below one folder: ``root/config``, ``root/data``, ``root/logs``."""
        root = Path(root)
        return cls(config_dir=root / "config", data_dir=root / "data", logs_dir=root / "logs")

    def ensure(self) -> None:
        """Create every folder (idempotent)."""
        for d in (self.config_dir, self.data_dir, self.logs_dir, self.master_dir, self.worker_dir):
            d.mkdir(parents=True, exist_ok=True)


class _BadSettings(ValueError):
    pass


def _is_number(v: object) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_address(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


def _check(name: str, v: object) -> Any:  # the type of the field ``name``
    """The value of field ``name`` as read from JSON, or _BadSettings."""
    if name in ("share_on_start", "auto_pause", "start_at_login", "first_run_done", "run_relay"):
        if isinstance(v, bool):
            return v
    elif name in ("device", "model", "group_name", "chat_master"):
        if isinstance(v, str) and len(v) <= 1000:
            return v
    elif name == "memory_limit_gb":
        if v is None:
            return None
        if _is_number(v) and math.isfinite(v) and v > 0:
            return float(v)
    elif name == "relay":
        from worker_core.address import is_address

        if isinstance(v, str) and (not v or is_address(v)):
            return v
    elif name == "group_host":
        if isinstance(v, str) and _is_address(v):
            return v
    elif name in ("group_port", "relay_port"):
        if _is_port(v):
            return v
    elif name == "firewall_ports":
        if isinstance(v, list) and len(v) <= 8 and all(_is_port(p) for p in v):
            return sorted(set(v))
    elif name == "firewall_allowed":
        if v is None or isinstance(v, bool):
            return v
    elif name == "paused_until":
        if v is None:
            return None
        if _is_number(v) and not math.isnan(v) and v >= 0:  # +inf = until resumed
            return float(v)
    raise _BadSettings(f"{name} has a bad value {v!r}")


def _is_port(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


def _parse(text: str) -> Settings:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _BadSettings(f"not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _BadSettings("not a JSON object")
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: _check(k, v) for k, v in raw.items() if k in known})


def load(paths: Paths) -> Settings:
    """The saved settings, or the defaults (see the module contract); never raises for a bad file."""
    path = paths.settings_file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Settings()
    except OSError as e:
        log.warning("cannot read %s (%s); using the default settings", path, e)
        return Settings()
    try:
        return _parse(data.decode("utf-8"))
    except (_BadSettings, UnicodeDecodeError) as e:
        bad = path.with_name(SETTINGS_FILE + ".bad")
        try:
            _replace(path, bad)
            kept = f"kept as {bad}"
        except OSError as e2:
            kept = f"could not keep it as {bad}: {e2}"
        log.warning("settings file %s is damaged (%s); using the defaults (%s)", path, e, kept)
        return Settings()


def _replace(src: Path, dst: Path) -> None:
    delay = SAVE_BACKOFF
    for attempt in range(SAVE_ATTEMPTS):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == SAVE_ATTEMPTS - 1:
                raise
            time.sleep(delay)  # a scanner holds the file: short, bounded back-off
            delay *= 2


def save(paths: Paths, settings: Settings) -> None:
    """Write the settings atomically; raises OSError if the folder is not writable."""
    path = paths.settings_file
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(settings), indent=2, sort_keys=True)  # inf is written as Infinity (read back by load)
    tmp = path.with_name(f".{SETTINGS_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.debug("cannot remove %s", tmp)
