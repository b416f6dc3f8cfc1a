"""What the desktop app asks of the operating system, without widgets: start at login
(``autostart``, ``autostart_base``, ``_windows_autostart``), one instance per user
(``single_instance``), the keyring (``secrets``), pausing while the GPU is busy (``autopause``,
``_windows_fullscreen``) and tying children to the app on Windows (``_windows_job``).  Imports
nothing of ``app`` above it (see docs/layout.md)."""
