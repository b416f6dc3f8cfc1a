"""Small named secrets of the tray app: the OS keyring, or else a private file with a visible warning.

Contract
--------
``SecretStore(fallback_dir, backend=None)`` keeps secrets under the keyring service ``"molink"``
(Windows Credential Manager, macOS Keychain, Secret Service on Linux).  ``backend`` is a keyring
backend object (``get_password``/``set_password``/``delete_password``); None means the ``keyring``
package's default backend, looked up on first use.  When there is no usable keyring (the package
is missing, its backend is ``fail`` or ``null``, or any call raises), the store switches for the
rest of the process to the file ``fallback_dir/secrets.json`` (mode 0600 on POSIX) and
:attr:`SecretStore.warning` becomes one sentence the app shows (reading it looks the backend up, so
a missing keyring is reported before the first secret is stored).  On Windows a file mode protects
nothing, so the warning there does not claim the file is private.

``get`` also looks in the file when the keyring has no entry, so a secret written while the
keyring was unavailable is still found later; ``set`` into a working keyring removes a stale
file copy; ``delete`` removes both.  Names are short identifiers (``[A-Za-z0-9._-]``, at most
64 characters); anything else is a ``ValueError``.  Secret values are never logged.

Separate from :mod:`master_core.secrets_store` (the master's one API key, module functions with a
fixed file name and no injectable backend); both use the service ``"molink"``, so
``SecretStore(...).get("api-key")`` reads the master's key where it sits in the keyring.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("molink.secrets")

SERVICE = "molink"
FALLBACK_FILE = "secrets.json"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _default_backend() -> Any | None:
    """The keyring package's backend, or None where it cannot work."""
    try:
        import keyring
        from keyring.backends import fail, null

        kr = keyring.get_keyring()
    except Exception as e:  # package missing, broken entry points, no D-Bus ...
        log.info("no keyring: %s", e)
        return None
    return None if isinstance(kr, (fail.Keyring, null.Keyring)) else kr


def _unusable(backend: Any) -> bool:
    try:
        from keyring.backends import fail, null
    except Exception:
        return False
    return isinstance(backend, (fail.Keyring, null.Keyring))


class SecretStore:
    def __init__(self, fallback_dir: Path, backend: Any | None = None, *, platform: str = sys.platform) -> None:
        self.fallback_file = Path(fallback_dir) / FALLBACK_FILE
        self._windows = platform.startswith("win")
        self._backend = backend
        self._looked_up = backend is not None
        self._lock = threading.Lock()
        self._warning: str | None = None
        if backend is not None and _unusable(backend):
            self._fall_back("the keyring backend is a fail/null backend")

    # ------------------------------------------------------------------ public
    def get(self, name: str) -> str | None:
        _check_name(name)
        with self._lock:
            kr = self._keyring()
            if kr is not None:
                try:
                    value = kr.get_password(SERVICE, name)
                    if value:
                        return value
                except Exception as e:
                    self._fall_back(f"reading failed: {type(e).__name__}")
            value = self._read_file().get(name)
            return value if isinstance(value, str) and value else None

    def set(self, name: str, value: str) -> None:
        _check_name(name)
        if not isinstance(value, str) or not value:
            raise ValueError("a secret is a non-empty string")
        with self._lock:
            kr = self._keyring()
            if kr is not None:
                try:
                    kr.set_password(SERVICE, name, value)
                    self._drop_from_file(name)
                    return
                except Exception as e:
                    self._fall_back(f"writing failed: {type(e).__name__}")
            data = self._read_file()
            data[name] = value
            self._write_file(data)

    def delete(self, name: str) -> None:
        """Forget ``name`` everywhere; deleting a missing secret is not an error."""
        _check_name(name)
        with self._lock:
            kr = self._keyring()
            if kr is not None:
                try:
                    kr.delete_password(SERVICE, name)
                except Exception as e:  # PasswordDeleteError for a missing entry is normal
                    if not _is_missing_entry(e):
                        self._fall_back(f"deleting failed: {type(e).__name__}")
            self._drop_from_file(name)

    @property
    def warning(self) -> str | None:
        """One sentence for the user when secrets go to the fallback file, else None.

        Reading it looks the keyring backend up (no secret is read); a keyring that looks usable but
        fails on use sets it at that first failure."""
        with self._lock:
            self._keyring()
            return self._warning

    @property
    def uses_keyring(self) -> bool:
        with self._lock:
            return self._keyring() is not None

    # ------------------------------------------------------------------ keyring
    def _keyring(self) -> Any | None:
        if self._warning is not None:
            return None
        if not self._looked_up:
            self._looked_up = True
            self._backend = _default_backend()
            if self._backend is None:
                self._fall_back("no keyring backend")
        return self._backend

    def _fall_back(self, why: str) -> None:
        if self._warning is None:
            log.warning("system keyring not usable (%s); secrets go to %s", why, self.fallback_file)
        self._backend = None
        if self._windows:
            self._warning = (
                f"The Windows Credential Manager is not available; secrets are stored unencrypted in "
                f"{self.fallback_file}."
            )
        else:
            self._warning = (
                f"The system keyring is not available; secrets are stored in {self.fallback_file}, "
                f"readable by your user account only."
            )

    # ------------------------------------------------------------------ file
    def _read_file(self) -> dict[str, str]:
        try:
            raw = json.loads(self.fallback_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s); treating it as empty", self.fallback_file, type(e).__name__)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}

    def _write_file(self, data: dict[str, str]) -> None:
        d = self.fallback_file.parent
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{FALLBACK_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            if not self._windows:
                os.chmod(tmp, 0o600)  # in case the file existed with wider rights
            os.replace(tmp, self.fallback_file)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _drop_from_file(self, name: str) -> None:
        data = self._read_file()
        if name in data:
            del data[name]
            if data:
                self._write_file(data)
            else:
                self.fallback_file.unlink(missing_ok=True)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError("a secret name is 1-64 letters, digits, '.', '_' or '-'")


def _is_missing_entry(e: Exception) -> bool:
    try:
        from keyring.errors import PasswordDeleteError
    except Exception:
        return False
    return isinstance(e, PasswordDeleteError)
