"""The interface of a login entry: what every OS's autostart offers (a leaf, so the Windows
one and the chooser in :mod:`app.desktop.system.autostart` both import it and not each other).

Contract: ``is_enabled()`` reads the OS state (the truth), ``set_enabled(on)`` creates or removes
the entry (``OSError`` if the OS refuses), ``blocked_by_user()`` is True when the entry exists but
the user turned it off in the OS's own settings (False unless an OS can tell).
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Autostart(ABC):
    @abstractmethod
    def is_enabled(self) -> bool: ...

    @abstractmethod
    def set_enabled(self, on: bool) -> None:
        """Create (True) or remove (False) the login entry; raises OSError if the OS refuses."""

    def blocked_by_user(self) -> bool:
        """True when our entry exists but the user turned it off in the OS's own settings."""
        return False
