"""What every RPC of the service shares, written once for both protocols (service.rpc.v2,
service.rpc.tfs): the gRPC status of a service error, the batcher's admission and the bytes in
flight, a clean INTERNAL for a bug, and the request metrics (protocol
"grpc", the method's full name as the route, the HTTP status whose gRPC code was sent), and
the bytes in flight of every call's message, counted with HTTP's by client address.

A handler raises ServiceError for anything a client did or must wait for; `rpc` turns it into
the status, so no handler calls `context.abort` itself. Services are registered with `add`,
whose parse hands a message that does not decode to the handler as `Malformed`, answered
INVALID_ARGUMENT (gRPC's own answer to a failed parse would be INTERNAL).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from urllib.parse import unquote

import grpc

from service.dataplane.inference import DataPlane
from service.dataplane.limits import Hold
from service.errors import BytesInFlight, MalformedRequest, ServiceError

log = logging.getLogger(__name__)

# HTTP status of a service error -> gRPC status code.
STATUS_OF = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
             413: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
             429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
             504: grpc.StatusCode.DEADLINE_EXCEEDED}
CANCELLED = 499  # the status counted for a call its client cancelled (nginx's "client closed request")


def rpc(route: str, infers: bool = False):
    """Decorate a servicer's method (self with a `plane`, the data plane): errors to statuses, counted and
    timed as `route`. Every call holds its message's bytes against the bytes in flight shared
    with HTTP (429: RESOURCE_EXHAUSTED) while it is answered; with `infers`, it first passes the
    batcher's admission, and the method is handed the call's Hold too (the data plane grows it
    by what the request's decoded strings hold).

    A refusal is sent after the handler's frames are gone: `context.abort` raises, and an
    exception raised while the request is still referenced from a frame keeps that frame, and
    so the message, alive in a reference cycle until the garbage collector runs."""

    def decorate(method):
        @functools.wraps(method)
        async def call(self, request, context):
            plane: DataPlane = self.plane
            started, status, hold = time.perf_counter(), 200, Hold(peer_address(context.peer()))
            code = message = None
            try:
                if isinstance(request, Malformed):
                    raise MalformedRequest(f"the request is not a valid {request.expected} message: {request.error}")
                size = request.ByteSize()
                if not plane.inflight.grow(hold, size):
                    raise BytesInFlight(plane.inflight.refusal(hold, size))
                if infers:
                    plane.check_admission()
                    return await method(self, request, context, hold)
                return await method(self, request, context)
            except ServiceError as exc:
                status = exc.status
                plane.count_refusal(exc)
                code, message = STATUS_OF.get(exc.status, grpc.StatusCode.INTERNAL), str(exc)
            except asyncio.CancelledError:
                status = CANCELLED
                raise
            except Exception:  # a bug costs this call an INTERNAL, never the server
                status = 500
                log.exception("%s failed", route)
                code, message = grpc.StatusCode.INTERNAL, "internal error (the server's log has it)"
            finally:
                plane.inflight.release_hold(hold)
                plane.metrics.observe_request(route, status, time.perf_counter() - started, "grpc")
            request = None  # noqa: F841 - the message goes now, not with the abort's traceback
            await context.abort(code, message)

        return call

    return decorate


def peer_address(peer: str) -> str:
    """The client's address in a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"),
    without its port: the peer whose bytes in flight are counted together with its HTTP ones."""
    kind, _, rest = unquote(peer).partition(":")  # grpcio writes IPv6 brackets as %5B and %5D
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


def deadline(context, default_ms: float) -> float | None:
    """The call's queue deadline (monotonic time): the client's, as X-Request-Timeout-Ms is on
    HTTP, else the default one (service.edge.asgi.deadline_from); None for neither."""
    remaining = context.time_remaining()
    if remaining is None:
        return time.monotonic() + default_ms / 1000 if default_ms > 0 else None
    return time.monotonic() + max(remaining, 1e-6)


class Malformed:
    """What a request that did not decode is handed to its handler as."""

    def __init__(self, expected: str, error: Exception):
        self.expected, self.error = expected, str(error)[:200] or type(error).__name__


def _parser(request_class):
    name = request_class.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return request_class.FromString(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever else its parser raises
            return Malformed(name, exc)

    return parse


def add(server, service: str, methods: dict) -> None:
    """Register unary methods on a grpc.aio server: {name: (handler, request class, response class)}."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
        name: grpc.unary_unary_rpc_method_handler(handler, request_deserializer=_parser(request),
                                                  response_serializer=response.SerializeToString)
        for name, (handler, request, response) in methods.items()}),))
