"""The edge's ASGI layer: HTTP's transport for the inference routes, answered in front of
FastAPI, and the one place every HTTP request is counted and timed.

Every request on the inference routes pays for the HTTP framework once; FastAPI's middleware
stack, dependency solving and response classes cost more than the batched inference itself on
small models. So the inference routes of every wire format (`rest`, `v2`) are matched here and
answered directly: the body read within its limit, the handler of the route's module called,
its Reply (or its error's) framed and sent. Every other route passes through to FastAPI.

The fast path (`fast_http`) answers a plain POST without ASGI at all: it finds this object
under uvicorn's middleware and calls `direct_route`, `admit`, `direct_reply`, `direct_done` and
`release`. Both ways share `_answer` (the same handlers, errors and metrics), `count`, and the
limits of `limits` (body size, bytes in flight), checked before a body is read.

No TensorFlow here: the handlers decode with a protocol's codec (service.protocols) and ask the
data plane (service.dataplane.inference), which knows nothing of HTTP.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, NamedTuple
from urllib.parse import parse_qsl

from fastapi import FastAPI

from service.dataplane.inference import DataPlane
from service.dataplane.limits import Hold, largest_body, peer_of
from service.edge import rest, v2
from service.edge.replies import Reply, encode, internal_error, refusal
from service.errors import BytesInFlight, InvalidInput, MalformedRequest, ModelNotFound, PayloadTooLarge, ServiceError

_MAX_LENGTH_DIGITS = 18  # a Content-Length longer than this is more than any limit: refused as such


@dataclass
class Call:
    """What a handler sees of a request: path parameters, query, lower-case headers, body, and
    the bytes in flight its body holds (which the data plane grows by what its decoded strings
    hold)."""

    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    hold: Hold | None = None

    def deadline(self, default_ms: float) -> float | None:
        """When the request must have left the queue: its X-Request-Timeout-Ms, else the default."""
        return deadline_from(self.headers, default_ms)


Handler = Callable[[Call, DataPlane], Awaitable[Reply]]


class Route(NamedTuple):
    """An inference route: its template, handler name, pattern, handler, and OpenAPI summary and
    request body schema."""

    template: str
    name: str
    pattern: re.Pattern
    handler: Handler
    summary: str
    body_schema: dict


def _pattern(template: str) -> re.Pattern:
    """The regular expression of a path template: {name} is one segment, {version} digits."""
    parts = re.split(r"(\{name\}|\{version\})", template)
    groups = {"{name}": r"(?P<name>[^/]+)", "{version}": r"(?P<version>\d+)"}
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts))


# Each wire format's module lists its routes as (template, handler, summary, body schema).
ROUTES: tuple[Route, ...] = tuple(
    Route(template, handler.__name__, _pattern(template), handler, summary, body)
    for template, handler, summary, body in (*rest.ROUTES, *v2.ROUTES))


def match_route(path: str) -> tuple[str, str, dict[str, str]] | None:
    """(template, handler name, path parameters) of an inference route, or None."""
    for route in ROUTES:
        m = route.pattern.fullmatch(path)
        if m:
            return route.template, route.name, m.groupdict()
    return None


_HANDLERS = {route.name: route.handler for route in ROUTES}


def deadline_from(headers: dict[str, str], default_ms: float) -> float | None:
    """Monotonic time by which the request must have left the queue, or None."""
    raw = headers.get("x-request-timeout-ms")
    if raw is None:
        return time.monotonic() + default_ms / 1000 if default_ms > 0 else None
    try:
        ms = float(raw)
    except ValueError:
        raise InvalidInput(f"X-Request-Timeout-Ms must be a number of milliseconds, got {raw!r}") from None
    if not ms > 0:
        raise InvalidInput("X-Request-Timeout-Ms must be positive")
    return time.monotonic() + ms / 1000


def decode_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI's header pairs as a dict of lower-case names (a repeated header keeps its last value)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def content_length(value: bytes | str) -> int | None:
    """A Content-Length value as a number of bytes; None if it is not one (ASCII digits only).
    Past 18 digits it is larger than any limit, and read as such without converting it."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) <= _MAX_LENGTH_DIGITS else 10 ** _MAX_LENGTH_DIGITS


class Edge:
    """ASGI: answers POSTs on the inference routes, hands everything else to `app` (FastAPI),
    and counts and times every HTTP request by route template and status."""

    def __init__(self, app: FastAPI, plane: DataPlane):
        self.app = app
        self.plane = plane
        self.settings, self.metrics, self.inflight = plane.settings, plane.metrics, plane.inflight
        self._limit: tuple[int, int] = (-1, self.settings.max_body_bytes)  # (manager generation, limit)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        found = match_route(scope["path"])
        if found is None:
            return await self._pass_on(scope, receive, send, started)
        template, handler, params = found
        if scope["method"] != "POST":
            reply = Reply(405, encode({"error": f"{scope['method']} is not allowed on {template}; use POST"}),
                          headers=[(b"allow", b"POST")])
        else:
            headers = decode_headers(scope["headers"])
            hold = Hold(peer_of(scope.get("client")))
            try:
                body = await self._read_body(headers, receive, hold)
            except ServiceError as exc:
                reply = self._refusal(exc, scope["path"])
            else:
                reply = await self._answer(scope["path"], handler, params, headers, scope["query_string"], body,
                                           hold)
            finally:
                body = None
                self.inflight.release_hold(hold)
        await send({"type": "http.response.start", "status": reply.status, "headers": reply.head()})
        await send({"type": "http.response.body", "body": reply.body})
        self.count(template, reply.status, started)

    async def _pass_on(self, scope, receive, send, started: float) -> None:
        """FastAPI's routes, counted by the template FastAPI matched."""
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.count(getattr(scope.get("route"), "path", "unmatched"), status, started)

    def count(self, route: str, status: int, started: float) -> None:
        """One answered HTTP request: counted by route template and status, and timed."""
        self.metrics.observe_request(route, status, time.perf_counter() - started)

    # -- the fast path (service.edge.fast_http): complete POSTs answered without ASGI ----------

    def direct_route(self, path: str) -> tuple[str, str, dict[str, str]] | None:
        """What `direct_reply` needs to answer a POST on `path`, or None: not an inference route."""
        return match_route(path)

    def admit(self, length: int, peer: str) -> Hold | None:
        """A Hold for the body of `length` bytes from `peer` if `length` is within the body
        limit, else None (the ASGI path refuses it, 413). Nothing is held until the body's bytes
        arrive (`hold_body`)."""
        return Hold(peer) if length <= self.body_limit() else None

    def hold_body(self, hold: Hold, path: str, size: int) -> Reply | None:
        """Let `hold` cover the `size` bytes of body arrived so far; the 429 to answer instead
        if the bytes in flight (all, or the peer's) do not allow it."""
        try:
            self._take(hold, size, size)
        except BytesInFlight as exc:
            return self._refusal(exc, path)
        return None

    def release(self, hold: Hold) -> None:
        """The request `admit` admitted is over: its bytes are free again."""
        self.inflight.release_hold(hold)

    async def direct_reply(self, route: tuple[str, str, dict[str, str]], path: str,
                           raw_headers: list[tuple[bytes, bytes]], query_string: bytes, body: bytes,
                           hold: Hold) -> Reply:
        """The reply to a POST whose whole body has arrived (within the size limit) and is held
        by `hold`; never raises."""
        return await self._answer(path, route[1], route[2], decode_headers(raw_headers), query_string, body, hold)

    def direct_done(self, route: tuple[str, str, dict[str, str]], status: int, started: float) -> None:
        self.count(route[0], status, started)

    # -- shared by both paths -------------------------------------------------------------------

    async def _answer(self, path: str, handler: str, params: dict, headers: dict[str, str],
                      query_string: bytes, body: bytes, hold: Hold) -> Reply:
        try:
            self.plane.check_admission()
            query = dict(parse_qsl(query_string.decode("latin-1"))) if query_string else {}
            return await _HANDLERS[handler](Call(params, query, headers, body, hold), self.plane)
        except ServiceError as exc:
            return self._refusal(exc, path)
        except Exception as exc:  # a bug must cost one 500, never the connection or the batcher
            return internal_error(exc, "POST", path)

    def _refusal(self, exc: ServiceError, path: str) -> Reply:
        self.plane.count_refusal(exc)
        return refusal(exc, "POST", path)

    def body_limit(self) -> int:
        """The largest body a valid request to the loaded ensembles can need, and never more
        than max_body_bytes (that alone while none is loaded)."""
        generation = self.plane.manager.generation
        if generation != self._limit[0]:  # a version was swapped: work it out again
            self._limit = (generation, self.plane.largest_request(largest_body, self.settings.max_body_bytes))
        return self._limit[1]

    def _take(self, hold: Hold, size: int, limit: int, declared: str | None = None) -> None:
        """Let `hold` cover `size` bytes of body: 413 past the body limit, 429 past the bytes in
        flight."""
        if size > limit:
            said = f" of {declared[:20]} bytes" if declared is not None else ""
            raise PayloadTooLarge(f"request body{said} exceeds the limit of {limit} bytes (the largest "
                                  "valid request of the models served, or max_body_bytes)")
        if not self.inflight.grow(hold, size):
            raise BytesInFlight(self.inflight.refusal(hold, size))

    async def _read_body(self, headers: dict[str, str], receive, hold: Hold) -> bytes:
        """The body, refusing before reading past the body limit (413: on the declared length
        before a byte is read) and counting its bytes in flight as they arrive (429)."""
        limit = self.body_limit()
        declared = headers.get("content-length")
        length = content_length(declared) if declared is not None else None
        if length is not None and length > limit:
            self._take(hold, length, limit, declared)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise MalformedRequest("the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            self._take(hold, size, limit)
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- OpenAPI --------------------------------------------------------------------------------

    @staticmethod
    def document(app: FastAPI) -> None:
        """List the inference routes in the app's OpenAPI schema (this layer answers them)."""
        for route in ROUTES:
            params = [{"name": p, "in": "path", "required": True,
                       "schema": {"type": "integer", "minimum": 1} if p == "version" else {"type": "string"}}
                      for p in ("name", "version") if f"{{{p}}}" in route.template]
            app.add_api_route(route.template, _answered_in_front, methods=["POST"], summary=route.summary,
                              openapi_extra={"parameters": params, "requestBody": {
                                  "required": True, "content": {"application/json": {"schema": route.body_schema}}}})


async def _answered_in_front() -> None:
    """Never called: the Edge answers these paths before FastAPI sees them."""
    raise ModelNotFound("not found")
