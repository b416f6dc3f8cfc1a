"""MoLink's desktop app: a PySide6 tray (or, without a tray, a small window) over the engine.

The app is a frontend (ARCHITECTURE §5, DESKTOP.md §6): it imports neither torch nor
transformers, and it runs the engine as child processes (``molink master``/``molink worker``
started with ``--supervised``) that it talks to over their stdin/stdout control channel and
the master's HTTP and admin endpoints.

Modules (one concept each):

* ``state``: the sharing state machine and the tray menu as data (pure).
* ``supervisor``: one supervised child process (QProcess): control channel, events, backoff.
* ``controller``: the app's logic: settings, the worker and master children, group actions.
* ``tray``: the tray icon and menu, or the main window where the desktop has no tray.
* ``dialogs``: create a group, join a group, settings.
* ``chat``/``sse``: the chat window and its streaming client.
* ``settings``, ``secrets``, ``autostart``, ``single_instance``, ``links``, ``autopause``,
  ``icons``: settings file, keyring, start at login, one instance, ``molink://`` links,
  pausing while the GPU is busy, icons.
* ``main``: ``molink app`` and ``molink app --selftest``.
"""
