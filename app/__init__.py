"""MoLink frontends: the command line, and (with PySide6) the tray app, chat window and pairing dialogs."""
