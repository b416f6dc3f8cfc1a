"""Where the master keeps its API key: the OS keyring, or else a 0600 file with a warning.

Contract: ``load_api_key(config_dir)`` returns the stored key or None; ``create_api_key(config_dir)``
makes a new random key, stores it, and returns ``(key, where)``.  The keyring (Windows
Credential Manager, macOS Keychain, Secret Service) is tried first; where none works, the
key goes to ``config_dir/api-key`` with mode 0600 and a logged warning saying so.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("molink.secrets")
SERVICE, USER = "molink", "api-key"


def _keyring():  # -> module | None
    try:
        import keyring
        from keyring.backends import fail

        if isinstance(keyring.get_keyring(), fail.Keyring):
            return None
        return keyring
    except Exception:  # no backend, no D-Bus session, locked store ...
        return None


def load_api_key(config_dir: Path) -> str | None:
    kr = _keyring()
    if kr is not None:
        try:
            key = kr.get_password(SERVICE, USER)
            if key:
                return key
        except Exception as e:
            log.warning("keyring unavailable (%s); looking for the key file", e)
    path = config_dir / "api-key"
    if path.exists():
        return path.read_text().strip() or None
    return None


def create_api_key(config_dir: Path) -> tuple[str, str]:
    key = "sk-molink-" + secrets.token_urlsafe(24)
    kr = _keyring()
    if kr is not None:
        try:
            kr.set_password(SERVICE, USER, key)
            return key, "the OS keyring"
        except Exception as e:
            log.warning("keyring refused the key (%s)", e)
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "api-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    log.warning("no OS keyring here: the API key is stored in %s (mode 0600)", path)
    return key, str(path)
