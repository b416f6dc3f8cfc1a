"""One lease held on the home router (a port mapping, an IPv6 pinhole): made, renewed, made again, removed.

Contract
--------
A :class:`Keeper` subclass says how to make, renew and remove its kind of lease
(``_make(previous)``, ``_renew(lease)``, ``_remove(lease)``; a lease has ``lifetime``, seconds,
0 for permanent, and ``describe()``).  ``await start()`` makes it (None: ``failure`` says why, one
line for a person) and starts a task that renews it at half its lifetime (a permanent lease needs
none); when renewal fails (:class:`~worker_core.portmap.errors.PortMapError` or ``OSError``) it
makes the lease again from scratch (``previous`` is the lost one, so a port can be kept), and
with no lease it tries again after ``RETRY`` seconds, doubling to ``RETRY_MAX``.
``on_change(lease | None)`` hears every change after ``start``.  ``await stop()`` cancels
renewal and removes the lease within ``STOP_TIMEOUT`` seconds (a router that is gone cannot
hold the caller; a failed removal is logged, never raised).  ``what`` names the kind in logs.

What is asked is the same for every kind: a TCP lease for ``internal_port`` of ``lease`` seconds,
by the ``protocols`` allowed (``udp_port``: NAT-PMP's and PCP's port, 5351 but in tests;
``upnp_timeout``: seconds for an SSDP search; ``_nonce``: PCP's, one per keeper).
``await _first(order, probes, make)`` asks the router every allowed way at once: each probe of
``probes`` runs concurrently (those of protocols not allowed are closed unrun); then, in
``order``, ``make(protocol, answer)`` for the first probe that answered makes the one lease
(a ``make`` that fails passes to the next); with none, ``failure`` lists each protocol's reason.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from ..tasks import end_tasks
from .errors import PortMapError
from .udp import PORT

log = logging.getLogger("molink.portmap")

RETRY = 30.0  # seconds before making the lease again after a failed renewal (doubling, at most RETRY_MAX)
RETRY_MAX = 600.0
STOP_TIMEOUT = 3.0  # seconds stop() may spend removing the lease


class Lease(Protocol):
    @property
    def lifetime(self) -> int: ...  # seconds granted; 0: permanent

    def describe(self) -> str: ...


L = TypeVar("L", bound=Lease)


class Keeper(Generic[L]):
    what = "lease"

    def __init__(
        self,
        internal_port: int,
        on_change: Callable[[L | None], object] | None,
        protocols: tuple[str, ...],
        lease: int,
        udp_port: int = PORT,
        upnp_timeout: int = 2,
    ) -> None:
        self.internal_port = internal_port
        self.on_change = on_change
        self.protocols = protocols
        self.lease = lease  # seconds asked for
        self.udp_port = udp_port
        self.upnp_timeout = upnp_timeout
        self.current: L | None = None
        self.failure = ""
        self._nonce = secrets.token_bytes(12)
        self._task: asyncio.Task | None = None

    async def _first(
        self,
        order: tuple[str, ...],
        probes: dict[str, Coroutine[Any, Any, object]],
        make: Callable[[str, object], Awaitable[L]],
    ) -> L | None:
        names = [p for p in order if p in self.protocols]
        tasks = {p: asyncio.ensure_future(probes.pop(p)) for p in names}
        for coro in probes.values():
            coro.close()
        outcome = dict(zip(names, await asyncio.gather(*tasks.values(), return_exceptions=True), strict=True))
        failures = []
        for name in names:  # preference order: the first that answered makes the one lease
            got = outcome[name]
            if isinstance(got, BaseException):
                failures.append(f"{name}: {got}")
                continue
            try:
                return await make(name, got)
            except (PortMapError, OSError) as e:
                failures.append(f"{name}: {e}")
        self.failure = "; ".join(failures)
        return None

    # ------------------------------------------------------------------ what a subclass says

    async def _make(self, previous: L | None) -> L | None:
        raise NotImplementedError

    async def _renew(self, lease: L) -> L:
        raise NotImplementedError

    async def _remove(self, lease: L) -> None:
        raise NotImplementedError

    def _made(self, lease: L) -> None:
        """Hook: the first lease was made (a subclass may warn about it)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> L | None:
        self.current = await self._make(None)
        if self.current is not None:
            log.info("%s made: %s", self.what, self.current.describe())
            self._made(self.current)
            self._task = asyncio.ensure_future(self._keep())
        else:
            log.info("no %s: %s", self.what, self.failure)
        return self.current

    async def stop(self) -> None:
        if self._task is not None:  # a renewal loop: cancelled until it ends (worker_core.tasks)
            await end_tasks([self._task])
            self._task = None
        lease, self.current = self.current, None
        if lease is None:
            return
        try:
            await asyncio.wait_for(self._remove(lease), STOP_TIMEOUT)
            log.info("%s removed: %s", self.what, lease.describe())
        except (PortMapError, asyncio.TimeoutError, OSError) as e:
            log.warning("could not remove the %s %s: %s", self.what, lease.describe(), e)

    async def _keep(self) -> None:
        retry = RETRY
        while True:
            lease = self.current
            if lease is None:
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
                fresh = await self._make(None)
            elif lease.lifetime == 0:
                return  # permanent: nothing to renew
            else:
                await asyncio.sleep(max(1.0, lease.lifetime / 2))
                try:
                    fresh = await self._renew(lease)
                except (PortMapError, OSError) as e:
                    log.warning("renewing the %s failed (%s): making it again", self.what, e)
                    fresh = await self._make(lease)
            if fresh is not None:
                retry = RETRY
            if fresh != self.current:
                log.info("%s now: %s", self.what, fresh.describe() if fresh else f"none ({self.failure})")
                self.current = fresh
                if self.on_change is not None:
                    self.on_change(fresh)
