"""MoLink's desktop app: a PySide6 tray (or, without a tray, a small window) over the engine.

The app is a frontend (ARCHITECTURE §5, DESKTOP.md §6): it imports neither torch nor
transformers, and it runs the engine as child processes (``molink master``/``molink worker``
started with ``--supervised``) that it talks to over their stdin/stdout control channel and
the master's HTTP and admin endpoints.

Modules (one concept each):

* ``state``: the sharing state machine and the tray menu as data (pure).
* ``supervisor``: one supervised child process (QProcess): control channel, events, backoff.
* ``controller``: the app's logic: settings, the worker and master children, group actions.
* ``desktop``: the controller wired to the tray or window, the dialogs and the chat window.
* ``tray``: the tray icon and menu, or the main window where the desktop has no tray.
* ``dialogs``, ``runtime_dialog``, ``background``: create a group, join a group, settings; the
  engine runtime's progress; a group command off the GUI thread.
* ``chat``/``chat_text``/``sse``: the chat window, its text, and its streaming client.
* ``settings``, ``icons``: settings file, icons.
* ``system/``: start at login, one instance, keyring, pausing while the GPU is busy, Windows
  job objects (no widgets); ``molink://`` links are :mod:`app.group.links`.
* ``main``: ``molink app`` and ``molink app --selftest`` (:mod:`app.desktop.selftest`).
"""
