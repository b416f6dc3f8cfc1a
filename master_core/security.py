"""HTTP guards of the master: Host allowlist, same-origin rule, API key, dashboard token.

Contract: ``guard_middleware(policy)`` is an aiohttp middleware applied to every route but
the worker tunnel (which issue 4 secures with mutual TLS):

* ``Host`` must name this server (loopback names, the bound host, or ``allowed_hosts``) with
  its port: a DNS-rebinding page gets 421 (misdirected request);
* a request carrying an ``Origin`` must come from the same origin: a foreign page gets 403.
  No CORS header is ever sent, so browsers keep foreign pages out of the responses too;
* with an API key configured, ``/v1/*`` requires ``Authorization: Bearer <key>`` (401 else);
* ``/admin/*`` (paired groups: pairing codes, members) requires ``Authorization: Bearer
  <admin token>``, the per-launch token the master writes to its data directory (0600);
* ``/dashboard`` and its data require the per-launch dashboard token (``?token=`` on the
  page, the ``X-MoLink-Token`` header on its data requests), or 401; its static script and
  style (no secrets) do not.
Keys and tokens are compared in constant time.  Errors are OpenAI-shaped JSON.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .errors import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
TUNNEL_PATH = "/v1/tunnel"


@dataclass(frozen=True)
class GuardPolicy:
    port: int
    hosts: frozenset[str]  # lower-case host names (without port) this server answers to
    api_key: str | None
    dashboard_token: str
    admin_token: str = ""  # /admin/* (paired groups) needs "Authorization: Bearer <token>"

    @staticmethod
    def build(
        bind_host: str,
        port: int,
        allowed_hosts: tuple[str, ...],
        api_key: str | None,
        dashboard_token: str,
        admin_token: str = "",
    ) -> GuardPolicy:
        names = {*LOOPBACK_NAMES, *(h.lower() for h in allowed_hosts)}
        if bind_host not in ("0.0.0.0", "::"):
            names.add(f"[{bind_host}]" if ":" in bind_host else bind_host.lower())
        return GuardPolicy(port, frozenset(names), api_key, dashboard_token, admin_token)

    def host_ok(self, host: str | None) -> bool:
        """``host`` is a Host header: ``name:port`` or ``[v6]:port`` (port omitted only for 80)."""
        if not host:
            return False
        host = host.lower()
        if host.startswith("["):
            end = host.find("]")
            if end < 0:
                return False
            name, rest = host[: end + 1], host[end + 1 :]
        else:
            name, _, port = host.partition(":")
            rest = host[len(name) :]
        if rest != f":{self.port}" and not (rest == "" and self.port == 80):
            return False
        return name in self.hosts


def _equal(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def guard_middleware(current: Callable[[], GuardPolicy | None]) -> Any:
    """``current()`` gives the policy in force (None until the server knows its port)."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if path == TUNNEL_PATH:
            return await handler(request)
        policy = current()
        if policy is None:
            return ApiError(503, "starting up", "service_unavailable").response()
        host = request.headers.get("Host") or ""
        if not policy.host_ok(host):
            return ApiError(
                421,
                f"this server does not answer to host {host!r}",
                "invalid_request_error",
                code="misdirected_request",
            ).response()
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in (f"http://{host.lower()}", f"https://{host.lower()}"):
            return ApiError(
                403, "cross-origin requests are refused", "invalid_request_error", code="forbidden_origin"
            ).response()
        if path.startswith("/v1/") and policy.api_key is not None:
            auth = request.headers.get("Authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not _equal(key.strip(), policy.api_key):
                return ApiError(
                    401,
                    "missing or wrong API key (Authorization: Bearer <key>)",
                    "authentication_error",
                    code="invalid_api_key",
                ).response()
        if path.startswith("/admin/"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if not policy.admin_token or scheme.lower() != "bearer" or not _equal(token.strip(), policy.admin_token):
                return ApiError(
                    401, "the admin API needs the token in the group's admin.json", "authentication_error"
                ).response()
        if path == "/dashboard" or (path.startswith("/dashboard/") and not path.startswith("/dashboard/static/")):
            token = request.query.get("token") or request.headers.get("X-MoLink-Token")
            if not _equal(token, policy.dashboard_token):
                return ApiError(
                    401,
                    "the dashboard needs the link printed at start-up (its token is missing or wrong)",
                    "authentication_error",
                ).response()
        response = await handler(request)
        if path.startswith("/dashboard"):
            response.headers["X-Frame-Options"] = "DENY"
            response.headers["Content-Security-Policy"] = (
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"
            )
            response.headers["Referrer-Policy"] = "no-referrer"
        return response

    return guard
