"""Starting engine processes from any frontend (``spawn``): the command line, the argv and
environment of ``molink`` children, and the local worker processes of the tools.  Imports only
:mod:`app.runtime` below it (see docs/layout.md)."""
