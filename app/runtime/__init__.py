"""The engine runtime of an installed app: building, checking and locating the per-user environment
(uv, lock files, the molink wheel) that engine processes run in.

Modules: ``build`` (states, plans and the builder), ``bundle`` (what the installed app ships),
``locks`` (lock files and the backend choice), ``files`` (JSON, trees, the build lock), ``console``
(``molink runtime ...``), ``process`` (child processes without a console window).  Imports nothing
else of ``app`` (the bottom room, see docs/layout.md).
"""
