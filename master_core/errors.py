"""The HTTP form of an error: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Contract: :class:`ApiError` carries the status that names who is at fault (4xx: the client;
503: the group cannot serve; 500: a bug) and renders the body with ``response()``.  The API,
its error middleware and the HTTP guards all raise or render this one type; it knows nothing
of requests or the engine.
"""

from __future__ import annotations

from aiohttp import web


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (a 503 of a group that cannot serve)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(self.body(), status=self.status, headers=headers)
