"""A paired group as the command line and the tray see it, without Qt: ``client`` (the group's
folder, ``group create``, pairing and joining, the running master's admin calls) and ``links``
(``molink://join`` links).  Imports nothing else of ``app`` (see docs/layout.md)."""
