"""Replies: what every route answers, the one mapping from an error to its reply, and the one
place a reply is framed as HTTP (status, content type, length, extra headers).

The inference routes build a `Reply` and send it as ASGI messages or, on the fast path
(`fast_http`), as raw bytes; the other routes (FastAPI) turn it into a Response with
`as_response`. Either way the head comes from `Reply.head`, so every route frames alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import QueueFull, ServiceError, Unauthorized
from service.protocols.arrays import encode

log = logging.getLogger(__name__)
JSON = b"application/json"


@dataclass
class Reply:
    """A response: status, body, content type and any extra headers (lower-case names)."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def head(self) -> list[tuple[bytes, bytes]]:
        """The response's headers: content type, length (one framed body, never chunked), extras."""
        return [(b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode()),
                *self.headers]


def json_reply(payload: dict[str, Any], status: int = 200) -> Reply:
    return Reply(status, encode(payload))


def error_reply(exc: ServiceError) -> Reply:
    """The reply to a refused request: {"error": message} with the error's status; 429 says
    when to come back, 401 which scheme to use."""
    headers = []
    if isinstance(exc, QueueFull):
        headers.append((b"retry-after", b"1"))
    elif isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    return Reply(exc.status, encode({"error": str(exc)}), headers=headers)


def refusal(exc: ServiceError, method: str, path: str) -> Reply:
    """`error_reply`, after the one logging rule: a server-side failure (5xx but not 503 or
    504, which say 'not now') is logged; the client's mistakes are not."""
    if exc.status >= 500 and exc.status not in (503, 504):
        log.error("%s %s failed: %s", method, path, exc)
    return error_reply(exc)


def internal_error(exc: BaseException, method: str, path: str) -> Reply:
    """A bug: logged with its traceback, answered 500 with the exception's type only."""
    log.error("%s %s failed unexpectedly", method, path, exc_info=exc)
    return Reply(500, encode({"error": f"internal error: {type(exc).__name__}"}))


def as_response(reply: Reply) -> Response:
    """A Reply as a FastAPI Response (for the routes FastAPI answers), framed by `Reply.head`."""
    response = Response(reply.body, reply.status)
    response.raw_headers = reply.head()
    return response


def install_error_replies(app: FastAPI) -> None:
    """Make FastAPI answer its routes' errors as `error_reply` does: the same body, statuses
    and logging as the inference routes."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return as_response(refusal(exc, request.method, request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
        return as_response(Reply(exc.status_code, encode({"error": str(exc.detail)}), headers=headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return as_response(Reply(422, encode({"error": f"{where}: {first.get('msg')}"})))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        return as_response(internal_error(exc, request.method, request.url.path))
