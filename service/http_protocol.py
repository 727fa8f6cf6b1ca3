"""uvicorn's httptools protocol, writing each response's head and body in one write.

uvicorn writes the status line and headers when the application sends `http.response.start`,
and the body when it sends `http.response.body`: two writes, so two `send` system calls and, on
loopback, two trips through the TCP stack per response. Measured on a bare route answering
a constant, `wrk -c32`, two interleaved rounds: 0.070-0.074 against 0.089-0.115 ms of the
event loop per request, 13,500-14,300 against 8,700-11,200 requests/s.

Here each request's cycle gets a transport that holds the head back and sends it in front of the
first body chunk (uvicorn writes a body for every response but those to HEAD, even an empty
one). Nothing else changes: a `100 Continue` (written before the response starts) and the
head of a HEAD response pass at once, and a cycle that closes the connection after its head
sends the head first, as uvicorn would have.

The direct lane: when the application (under uvicorn's middleware) has direct routes (see
service.inference_routes), a POST on one of them with a Content-Length within its body limit
is answered without ASGI, from the protocol (`OneWriteProtocol._direct`). Answering a
constant, uvicorn's ASGI cycle costs the loop 0.06-0.09 ms per request, a plain protocol on
the same parser ~0.025 ms; on the service, 32 connections, four interleaved rounds against
the ASGI path: 3,662-4,058 against 3,290-3,807 requests/s.

Pass `http=protocol()` to uvicorn: this module's protocol, or, where the installed uvicorn lacks
the hook it relies on, uvicorn's own choice with a warning.
"""

from __future__ import annotations

import contextvars
import logging
import time

log = logging.getLogger(__name__)

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: uvicorn picks its h11 protocol; nothing to change
    HttpToolsProtocol = None

PROTOCOL = "service.http_protocol:OneWriteProtocol"


class OneWriteTransport:
    """One request cycle's view of the connection's transport: holds the response head back
    until the first body write (or a close).

    It lets go of its cycle once the head is out: the cycle holds it, so holding the cycle any
    longer would leave one reference cycle per request for the garbage collector, whose
    collections then stalled the loop (measured: p99 18-20 ms against 5 ms on a bare route)."""

    __slots__ = ("_transport", "_cycle", "_head")

    def __init__(self, transport, cycle):
        self._transport = transport
        self._cycle = cycle  # None once the head is out: then everything passes straight through
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        cycle = self._cycle
        if cycle is None:
            self._transport.write(data)
        elif self._head is not None:  # the first body write: head and body together
            self._cycle = None
            head, self._head = self._head, None
            self._transport.write(head + data)
        elif cycle.response_started:  # the response head
            if cycle.scope["method"] == "HEAD":  # no body will follow
                self._cycle = None
                self._transport.write(data)
            else:
                self._head = data
        else:  # `100 Continue`, before the response starts
            self._transport.write(data)

    def close(self) -> None:
        """Send a held head first (a response broken off after its start), as uvicorn would have."""
        self._cycle = None
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length, or None when it has none, an invalid one, or a
    Transfer-Encoding (names are lower-case, as uvicorn gives them)."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            return None
    return int(length) if length is not None and length.isdigit() else None


def find_lane(app):
    """The application object under uvicorn's middleware that answers POSTs directly (one
    with `direct_route`, `direct_reply` and `direct_done`), or None."""
    for _ in range(8):  # uvicorn wraps the app in at most a few middlewares
        if app is None or hasattr(app, "direct_route"):
            return app
        app = getattr(app, "app", None)
    return None


if HttpToolsProtocol is not None and hasattr(HttpToolsProtocol, "_start_asgi_task"):
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    class OneWriteProtocol(HttpToolsProtocol):
        """HttpToolsProtocol whose request cycles write each response once, and which answers
        plain POSTs on the application's direct routes without ASGI (see `_direct`)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Access lines are written by uvicorn's ASGI cycle (with the client address its
            # proxy-headers middleware works out), so with an access log every request takes it.
            self.lane = None if self.access_log else find_lane(self.app)

        def _start_asgi_task(self, cycle, app) -> None:
            lane = self.lane
            if lane is not None and app is self.app and not cycle.waiting_for_100_continue:
                scope = cycle.scope
                if scope["method"] == "POST":
                    route = lane.direct_route(scope["path"])
                    if route is not None:
                        length = declared_length(scope["headers"])
                        if length is not None and length <= lane.settings.max_body_bytes:
                            self._start_direct(cycle, lane, route)
                            return
            cycle.transport = OneWriteTransport(self.transport, cycle)
            super()._start_asgi_task(cycle, app)

        def _start_direct(self, cycle, lane, route) -> None:
            if self.config.reset_contextvars:
                task = self.loop.create_task(self._direct(cycle, lane, route), context=contextvars.Context())
            else:
                task = self.loop.create_task(self._direct(cycle, lane, route))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

        async def _direct(self, cycle, lane, route) -> None:
            """Answer one request with the lane's reply: read the body as uvicorn's `receive`
            would, then write the response as its `send` would, head and body in one write.

            Skipped per request, against the ASGI path: uvicorn's proxy-headers middleware and
            ASGI wrapper, the receive and send messages and their checks (measured: see the
            module's docstring). Requests the lane is not given (other methods and paths,
            no Content-Length or one over the limit, chunked bodies, `Expect: 100-continue`,
            an access log) take the ASGI path, which refuses or serves them as before."""
            started = time.perf_counter()
            try:
                while cycle.more_body and not cycle.disconnected:
                    cycle.flow.resume_reading()
                    await cycle.message_event.wait()
                    cycle.message_event.clear()
                if cycle.disconnected:
                    return
                scope = cycle.scope
                reply = await lane.direct_reply(route, scope["path"], scope["headers"],
                                                scope["query_string"], bytes(cycle.body))
                cycle.body = bytearray()  # the cycle outlives the request: let the body go
                if cycle.flow.write_paused and not cycle.disconnected:
                    await cycle.flow.drain()
                if not cycle.disconnected:
                    content = [STATUS_LINE[reply.status]]
                    for name, value in cycle.default_headers:
                        content += (name, b": ", value, b"\r\n")
                    content += (b"content-type: ", reply.content_type,
                                b"\r\ncontent-length: ", str(len(reply.body)).encode(), b"\r\n")
                    for name, value in reply.headers:
                        content += (name, b": ", value, b"\r\n")
                    if not cycle.keep_alive:
                        content.append(b"connection: close\r\n")
                    content += (b"\r\n", reply.body)
                    cycle.response_started = True
                    cycle.transport.write(b"".join(content))
                    cycle.response_complete = True
                    cycle.message_event.set()
                    if not cycle.keep_alive:
                        cycle.transport.close()
                    cycle.on_response()
                lane.direct_done(route, reply.status, started)
            except BaseException as exc:  # as uvicorn's ASGI wrapper: a 500, or a closed connection
                self.logger.error("Exception answering %s", cycle.scope["path"], exc_info=exc)
                if not cycle.response_started:
                    await cycle.send_500_response()
                else:
                    cycle.transport.close()
            finally:
                cycle.on_response = _nothing

    SUPPORTED = True
else:  # pragma: no cover - depends on the installed uvicorn
    OneWriteProtocol = HttpToolsProtocol
    SUPPORTED = False


def _nothing() -> None:
    pass


def protocol() -> str:
    """The `http` option for uvicorn: this module's protocol, or uvicorn's choice where the
    installed uvicorn cannot take it."""
    if SUPPORTED:
        return PROTOCOL
    log.warning("uvicorn's httptools protocol has no _start_asgi_task here; responses are written "
                "in two writes (install httptools and uvicorn>=0.30)")
    return "auto"
