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
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)
