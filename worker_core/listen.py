"""Binding a listener to both address families on one port.

Contract
--------
``families(host)``: the hosts a listener for ``host`` binds: ``"::"`` (every interface) is
``("0.0.0.0", "::")``, anything else itself alone.  asyncio makes an IPv6 listener IPv6-only,
so "both families" is two sockets on one port.

``await bind(runner, hosts, port, ssl_context, what)`` starts one site of ``runner`` per host:
the first on ``port`` (0 picks one), the others on the port the first got, and returns that
port.  The first failing raises ``OSError``; a later one (typically: this machine has no IPv6)
is logged as a warning, and the listener keeps the families it got.  Used by the master's
group port and the workers' hop listeners.
"""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

log = logging.getLogger("molink.listen")

EVERY_INTERFACE = "::"  # both families


def families(host: str) -> tuple[str, ...]:
    """The hosts a listener for ``host`` binds (``"::"``: IPv4 and IPv6, every interface)."""
    return ("0.0.0.0", "::") if host == EVERY_INTERFACE else (host,)


async def bind(
    runner: web.AppRunner, hosts: tuple[str, ...], port: int, ssl_context: ssl.SSLContext | None, what: str
) -> int:
    """Start ``runner`` on each of ``hosts`` at one port; returns the port (see the module doc)."""
    first, *others = hosts
    await web.TCPSite(runner, first, port, ssl_context=ssl_context).start()
    port = runner.addresses[0][1]  # the bound port (0 picks one)
    for host in others:
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        except OSError as e:
            log.warning("%s on %s only: %s port %d unavailable (%s)", what, first, host, port, e)
    return port
