"""The inference routes, as a pure ASGI layer in front of the FastAPI application.

Every request on these routes pays for the HTTP framework once; FastAPI's middleware stack,
dependency solving and response classes cost more than the batched inference itself on small
models (measured: 3,800 requests/s for FastAPI answering a constant, 7,500 for pure ASGI). So
the three inference routes are matched here and answered directly; every other route (health,
readiness, models, metrics, metadata) passes through to FastAPI untouched.

ASGI itself costs uvicorn more per request than the rest of its HTTP handling, so a plain POST
(a Content-Length within the body limit) skips it too: service.http_protocol finds this object
under uvicorn's middleware and calls `direct_route`, `direct_reply` and `direct_done` from its
protocol. Both ways share `_answer`: the same handlers, errors and metrics.

    POST /predict                                       this service's format (TF Serving rows)
    POST /v1/models/{name}[/versions/{v}]:predict      TensorFlow Serving: `instances` or `inputs`
    POST /v2/models/{name}[/versions/{v}]/infer        Open Inference Protocol, JSON or binary

No TensorFlow here: the ensemble comes from the manager, the rows go through the batcher.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from service import codec
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    InvalidInput,
    MalformedRequest,
    PayloadTooLarge,
    QueueFull,
    ServiceError,
)
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)
JSON = b"application/json"
_REJECT_REASONS = {QueueFull: "queue_full", DeadlineExceeded: "deadline", PayloadTooLarge: "too_large"}
_TRUE = {"1", "true", "yes"}


@dataclass
class Call:
    """What a handler sees of a request: path parameters, query, lower-case headers, body."""

    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def error_reply(exc: ServiceError) -> Reply:
    headers = [(b"retry-after", b"1")] if isinstance(exc, QueueFull) else []
    return Reply(exc.status, codec.encode({"error": str(exc)}), headers=headers)


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


def _version(call: Call) -> int | None:
    v = call.params.get("version")
    return int(v) if v else None


class InferenceHandlers:
    """The three inference handlers; `state` is the FastAPI app's state (manager, batcher)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, state: Any):
        self.settings = settings
        self.metrics = metrics
        self.state = state

    async def _infer(self, call: Call, ensemble, x):
        deadline = deadline_from(call.headers, self.settings.request_timeout_ms)
        result = await self.state.batcher.submit(ensemble, x, deadline)
        self.metrics.observe_rows(ensemble.name, len(x))
        return result

    async def predict(self, call: Call) -> Reply:
        manager = self.state.manager
        ensemble = manager.get(manager.default_name())
        return await self._rows(call, ensemble)

    async def tfs_predict(self, call: Call) -> Reply:
        return await self._rows(call, self.state.manager.get(call.params["name"], _version(call)))

    async def _rows(self, call: Call, ensemble) -> Reply:
        s = self.settings
        fast = codec.numeric_rows(call.body, ensemble.input_spec, s.max_rows_per_request)
        if fast is not None:
            field, x = fast
            columnar = field == "inputs"
        else:
            payload = codec.parse_json_object(call.body)
            columnar = "inputs" in payload and "instances" not in payload
            if columnar:
                x = codec.columnar_inputs(payload["inputs"], ensemble.input_spec, s.max_rows_per_request)
            else:
                x = codec.instances_to_array(payload.get("instances"), ensemble.input_spec,
                                             s.max_rows_per_request)
        average, per_member = await self._infer(call, ensemble, x)
        body: dict[str, Any] = {
            "outputs" if columnar else "predictions": average,
            "labels": codec.predicted_labels(average, ensemble.classes),
            "classes": ensemble.classes,
            "model": {"name": ensemble.name, "version": ensemble.version},
        }
        if call.query.get("members", "").lower() in _TRUE:
            body["members"] = codec.members_by_name(per_member, [m.name for m in ensemble.manifest.members])
            body["disagreement"] = codec.disagreement(per_member, average)
        return Reply(200, codec.encode(body))

    async def v2_infer(self, call: Call) -> Reply:
        ensemble = self.state.manager.get(call.params["name"], _version(call))
        head, binary = codec.split_binary_body(call.body, call.headers.get("inference-header-content-length"))
        payload = codec.parse_json_object(head)
        x = codec.v2_input_array(payload, binary, ensemble.input_spec, self.settings.max_rows_per_request)
        wanted, binary_outputs = codec.v2_wants(payload)
        average, per_member = await self._infer(call, ensemble, x)
        tensors = {n: (average if n == "probabilities" else per_member) for n in wanted}
        content, header_length = codec.v2_response(ensemble.name, ensemble.version, payload.get("id"),
                                                   tensors, binary_outputs)
        if header_length is None:
            return Reply(200, content)
        return Reply(200, content, b"application/octet-stream",
                     [(b"inference-header-content-length", str(header_length).encode())])


ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("/predict", re.compile(r"/predict"), "predict"),
    ("/v1/models/{name}:predict", re.compile(r"/v1/models/(?P<name>[^/]+):predict"), "tfs_predict"),
    ("/v1/models/{name}/versions/{version}:predict",
     re.compile(r"/v1/models/(?P<name>[^/]+)/versions/(?P<version>\d+):predict"), "tfs_predict"),
    ("/v2/models/{name}/infer", re.compile(r"/v2/models/(?P<name>[^/]+)/infer"), "v2_infer"),
    ("/v2/models/{name}/versions/{version}/infer",
     re.compile(r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>\d+)/infer"), "v2_infer"),
]


def match_route(path: str) -> tuple[str, str, dict[str, str]] | None:
    """(template, handler name, path parameters) of an inference route, or None."""
    for template, pattern, handler in ROUTES:
        m = pattern.fullmatch(path)
        if m:
            return template, handler, m.groupdict()
    return None


class InferenceRoutes:
    """ASGI: answers POSTs on the inference routes, hands everything else to `app`."""

    def __init__(self, app, settings: Settings, metrics: ServiceMetrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.handlers = InferenceHandlers(settings, metrics, app.state)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            found = match_route(scope["path"])
            if found is not None:
                if scope["method"] == "POST":
                    return await self._serve(scope, receive, send, *found)
                return await self._method_not_allowed(scope, send, found[0])
        await self.app(scope, receive, send)

    async def _method_not_allowed(self, scope, send, template: str) -> None:
        body = codec.encode({"error": f"{scope['method']} is not allowed on {template}; use POST"})
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"content-type", JSON), (b"content-length", str(len(body)).encode()),
                                (b"allow", b"POST")]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.requests.labels(template, "405").inc()

    async def _serve(self, scope, receive, send, template: str, handler: str, params: dict) -> None:
        started = time.perf_counter()
        try:
            headers = decode_headers(scope["headers"])
            body = await self._read_body(headers, receive)
        except ServiceError as exc:
            reply = self._refusal(exc, scope["path"])
        else:
            reply = await self._answer(scope["path"], handler, params, headers, scope["query_string"], body)
        # With a content-length the server writes one framed response, not a chunked one.
        headers = [(b"content-type", reply.content_type),
                   (b"content-length", str(len(reply.body)).encode()), *reply.headers]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        self.metrics.observe_request(template, reply.status, time.perf_counter() - started)

    # -- the direct lane (service.http_protocol): complete POSTs answered without ASGI ----------

    def direct_route(self, path: str) -> tuple[str, str, dict[str, str]] | None:
        """What `direct_reply` needs to answer a POST on `path`, or None: not an inference route."""
        return match_route(path)

    async def direct_reply(self, route: tuple[str, str, dict[str, str]], path: str,
                           raw_headers: list[tuple[bytes, bytes]], query_string: bytes, body: bytes) -> Reply:
        """The reply to a POST whose whole body has arrived (within the size limit); never raises."""
        return await self._answer(path, route[1], route[2], decode_headers(raw_headers), query_string, body)

    def direct_done(self, route: tuple[str, str, dict[str, str]], status: int, started: float) -> None:
        self.metrics.observe_request(route[0], status, time.perf_counter() - started)

    async def _answer(self, path: str, handler: str, params: dict, headers: dict[str, str],
                      query_string: bytes, body: bytes) -> Reply:
        try:
            self.handlers.state.batcher.check_admission()
            query = dict(parse_qsl(query_string.decode("latin-1"))) if query_string else {}
            return await getattr(self.handlers, handler)(Call(params, query, headers, body))
        except ServiceError as exc:
            return self._refusal(exc, path)
        except Exception as exc:  # a bug must cost one 500, never the connection or the batcher
            log.exception("POST %s failed unexpectedly", path)
            return Reply(500, codec.encode({"error": f"internal error: {type(exc).__name__}"}))

    def _refusal(self, exc: ServiceError, path: str) -> Reply:
        reason = _REJECT_REASONS.get(type(exc))
        if reason:
            self.metrics.rejected.labels(reason).inc()
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("POST %s failed: %s", path, exc)
        return error_reply(exc)

    async def _read_body(self, headers: dict[str, str], receive) -> bytes:
        """The body, refusing (413) before reading past the configured limit."""
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise MalformedRequest("the client went away before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
