"""The developer and trying-out tools behind `molink demo|selftest|eval|loadtest|bench|chaos`:
``demo``, ``selftest``, ``evaluate`` (with ``data/``), ``loadtest`` and the packages ``bench``,
``chaos`` and ``netlab``.  They start engine processes through :mod:`app.proc`; nothing outside
``app.cli`` imports them (see docs/layout.md)."""
