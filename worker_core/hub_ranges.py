"""Read a worker's tensors straight from the model's hub repository, when it can.

Contract
--------
``await fetch_from_hub(cache, specs, hub)`` tries to put the missing tensors of ``specs`` into
``cache`` (a :class:`~worker_core.weights.WeightCache`) by HTTP range requests on the files of
the hub snapshot ``hub`` (``owner/name@commit``): exactly each tensor's bytes (its spec's
``file`` and ``offset``), never whole files.  The hub gives no hash per chunk, so only the
whole-tensor SHA-256 of the manifest (which the master computed) vouches for the bytes; a
tensor that fails it, and any error at all (offline, unknown or gated repository, a server
that ignores ``Range``), ends the attempt: partial downloads are discarded and the function
returns, logging why.  It returns the bytes received; whatever is still missing the caller
fetches from the master.  The endpoint and token are the ones ``huggingface_hub`` is configured
with (``HF_ENDPOINT``, default ``https://huggingface.co``; ``HF_TOKEN`` or a stored login).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from urllib.parse import quote

import aiohttp

from .weights import WeightCache, WeightError
from .wire import TensorSpec

log = logging.getLogger("molink.hub")

CONNECT_TIMEOUT = 10.0  # seconds: an offline machine gives up quickly and asks the master
READ_TIMEOUT = 60.0  # seconds per chunk


class HubError(Exception):
    """The hub did not serve a range as asked."""


def _endpoint() -> str:
    """The hub's address as ``huggingface_hub`` configures it (``HF_ENDPOINT``, else the hub)."""
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT.rstrip("/")
    except ImportError:
        return "https://huggingface.co"


def _token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no huggingface_hub or no stored login: anonymous
        return None


class _Ranges:
    """A ``ChunkRequest`` over the hub: ``(sha256, offset, length)`` -> the bytes at that place."""

    def __init__(self, http: aiohttp.ClientSession, hub: str, specs: list[TensorSpec]) -> None:
        repo, commit = hub.rsplit("@", 1)
        endpoint = _endpoint()
        self.base = f"{endpoint}/{repo}/resolve/{commit}/"
        self.http = http
        self.where = {s.sha256: s for s in specs}
        token = _token()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def __call__(self, sha256: str, offset: int, length: int) -> tuple[bytes, str]:
        spec = self.where[sha256]
        first = spec.offset + offset
        headers = dict(self.headers, Range=f"bytes={first}-{first + length - 1}")
        async with self.http.get(self.base + quote(spec.file), headers=headers) as r:
            if r.status != 206:  # 200 would be the whole file: never download more than asked
                raise HubError(f"{spec.file}: HTTP {r.status} for a range request")
            data = bytearray()
            async for block in r.content.iter_chunked(1 << 16):
                data += block
                if len(data) > length:
                    break
        if len(data) != length:
            raise HubError(f"{spec.file}: {len(data)} bytes for a range of {length}")
        return bytes(data), hashlib.sha256(data).hexdigest()


async def fetch_from_hub(cache: WeightCache, specs: list[TensorSpec], hub: str) -> int:
    todo = [s for s in cache.missing(specs) if s.file]
    if not todo:
        return 0
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            received = await cache.fetch(todo, _Ranges(http, hub, todo))
    except (HubError, WeightError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        cache.discard_partial(todo)
        log.warning("cannot read the weights from the hub (%s: %s); the master sends them", type(e).__name__, e)
        return 0
    dt = time.perf_counter() - t0
    log.info("weights read from the hub %s: %.1f MB in %.2f s", hub, received / 1e6, dt)
    return received
