"""The fast HTTP path: uvicorn's httptools protocol, writing each response in one write and
answering plain POSTs on the inference routes without ASGI. The only module that uses uvicorn's
internals.

One write: uvicorn writes the status line and headers when the application sends
`http.response.start`, and the body when it sends `http.response.body`: two writes, so two
`send` system calls and, on loopback, two trips through the TCP stack per response. Here each
request's cycle gets a transport that holds the head back and sends it in front of the first
body chunk (uvicorn writes a body for every response but those to HEAD, even an empty one).
Nothing else changes: a `100 Continue` (written before the response starts) and the head of a
HEAD response pass at once, and a cycle that closes the connection after its head sends the
head first, as uvicorn would have.

The direct lane: a POST on an inference route (`service.edge.asgi.Edge.direct_route`) with
a Content-Length within the body limit is answered from the protocol (`OneWriteProtocol._direct`),
without uvicorn's ASGI cycle (its proxy-headers middleware, ASGI wrapper, the receive and send
messages and their checks). Everything else takes the ASGI path.

Both rely on uvicorn's private names (`HttpToolsProtocol._start_asgi_task`, the request
cycle's attributes, `STATUS_LINE`, `config.reset_contextvars`), so pyproject.toml pins uvicorn
to the releases this was tested on, and `check()` runs the protocol once per process, on a
connection of its own, through every name it uses: an ASGI request, a direct one kept alive
and a direct one that closes. If any answer is not what it must be, uvicorn's own protocol
serves instead, after one warning. `protocol(settings)` is the `http` option to give uvicorn;
`path_in_use(settings)` says which path serves (GET /models, the `ensemble_http_fast_path`
metric). docs/performance.md has the A/B measurements of both paths.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time

from service.config import Settings
from service.edge.guard import guarded
from service.edge.asgi import content_length
from service.dataplane.limits import peer_of

log = logging.getLogger(__name__)

try:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError:  # httptools missing (uvicorn picks its h11 protocol), or names changed
    HttpToolsProtocol = STATUS_LINE = None

def _stock_protocol() -> type:
    """uvicorn's own protocol, as its "auto" option picks it: httptools', else h11's."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as stock
    except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as stock
    return stock


PROTOCOL = "service.edge.fast_http:GuardedOneWriteProtocol"
STOCK_PROTOCOL = "service.edge.fast_http:GuardedStockProtocol"


class OneWriteTransport:
    """One request cycle's view of the connection's transport: holds the response head back
    until the first body write (or a close).

    It lets go of its cycle once the head is out: the cycle holds it, so holding the cycle any
    longer would leave one reference cycle per request for the garbage collector, whose
    collections then stalled the loop (docs/performance.md)."""

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
    return content_length(length) if length is not None else None


def find_lane(app):
    """The application object under uvicorn's middleware that answers POSTs directly (one
    with `direct_route`, `admit`, `hold_body`, `direct_reply`, `direct_done` and `release`), or
    None."""
    for _ in range(8):  # uvicorn wraps the app in at most a few middlewares
        if app is None or hasattr(app, "direct_route"):
            return app
        app = getattr(app, "app", None)
    return None


if HttpToolsProtocol is not None and hasattr(HttpToolsProtocol, "_start_asgi_task"):

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
                        hold = lane.admit(length, peer_of(self.client)) if length is not None else None
                        if hold is not None:
                            self._start_direct(cycle, lane, route, hold)
                            return
            cycle.transport = OneWriteTransport(self.transport, cycle)
            super()._start_asgi_task(cycle, app)

        def _start_direct(self, cycle, lane, route, hold) -> None:
            if self.config.reset_contextvars:
                task = self.loop.create_task(self._direct(cycle, lane, route, hold), context=contextvars.Context())
            else:
                task = self.loop.create_task(self._direct(cycle, lane, route, hold))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

        async def _direct(self, cycle, lane, route, hold) -> None:
            """Answer one request with the lane's reply: read the body as uvicorn's `receive`
            would, then write the response as its `send` would, head and body in one write.

            Skipped per request, against the ASGI path: uvicorn's proxy-headers middleware and
            ASGI wrapper, the receive and send messages and their checks. Requests the lane is
            not given (other methods and paths, no Content-Length or one over the body limit,
            chunked bodies, `Expect: 100-continue`, an access log) take the ASGI path, which
            refuses or serves them as before. A body whose bytes pass the bytes in flight is
            answered 429 as they do, and the rest of it discarded as it arrives."""
            started = time.perf_counter()
            scope = cycle.scope
            try:
                # The body's bytes are held in flight as they arrive: uvicorn stops reading
                # past its high-water mark until this loop has counted them.
                refused = None
                while cycle.more_body and not cycle.disconnected:
                    cycle.flow.resume_reading()
                    await cycle.message_event.wait()
                    cycle.message_event.clear()
                    refused = lane.hold_body(hold, scope["path"], len(cycle.body))
                    if refused is not None:
                        break
                if cycle.disconnected:
                    return
                if refused is not None:  # uvicorn discards the rest of the body, as on the ASGI path
                    reply, cycle.body = refused, bytearray()
                else:
                    body, cycle.body = bytes(cycle.body), bytearray()  # one copy of the body, not two
                    reply = lane.hold_body(hold, scope["path"], len(body)) or await lane.direct_reply(
                        route, scope["path"], scope["headers"], scope["query_string"], body, hold)
                    del body
                if cycle.flow.write_paused and not cycle.disconnected:
                    await cycle.flow.drain()
                if not cycle.disconnected:
                    content = [STATUS_LINE[reply.status]]
                    for name, value in cycle.default_headers:
                        content += (name, b": ", value, b"\r\n")
                    for name, value in reply.head():
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
                lane.release(hold)

    GuardedOneWriteProtocol = guarded(OneWriteProtocol)
else:  # pragma: no cover - depends on the installed uvicorn
    OneWriteProtocol = GuardedOneWriteProtocol = None

# uvicorn's own protocol, as its "auto" option picks it, with the same limits of service.edge.guard.
GuardedStockProtocol = guarded(_stock_protocol())


def _nothing() -> None:
    pass


def protocol(settings: Settings) -> str:
    """The `http` option for uvicorn: this module's protocol when the settings ask for the fast
    path and `check()` passed, else uvicorn's own; either behind service.edge.guard's limits."""
    return PROTOCOL if path_in_use(settings) == "fast" else STOCK_PROTOCOL


def path_in_use(settings: Settings) -> str:
    """"fast" (this module) or "stock" (uvicorn's own protocol): what serves HTTP."""
    return "fast" if settings.http_fast_path and check() is None else "stock"


@functools.lru_cache(maxsize=1)
def check() -> str | None:
    """None if this uvicorn runs the fast path as it must, else what failed (logged once as a
    warning: uvicorn's own protocol serves instead). Runs on a thread of its own, with an event
    loop of its own, so it can be called from anywhere, a running loop included."""
    if OneWriteProtocol is None:
        problem = "uvicorn's httptools protocol, its STATUS_LINE or its _start_asgi_task is missing"
    else:
        outcome: list[str | None] = []
        probe = threading.Thread(target=lambda: outcome.append(_probe()), name="fast-http-check")
        probe.start()
        probe.join(10)
        problem = outcome[0] if outcome else "the check did not finish in 10 s"
    if problem is not None:
        log.warning("HTTP is served by uvicorn's own protocol, not the fast path: %s (pyproject.toml "
                    "names the uvicorn releases the fast path runs on)", problem)
    return problem


class _Probe:
    """A tiny application with one direct route, like service.edge.asgi.Edge."""

    class Reply:
        status, body, headers = 200, b"direct", []

        def head(self):
            return [(b"content-type", b"text/plain"), (b"content-length", b"6")]

    async def __call__(self, scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"asgi"})

    def direct_route(self, path):
        return ("/direct", "probe", {}) if path == "/direct" else None

    def admit(self, length, peer):
        return object() if length <= 100 else None

    def hold_body(self, hold, path, size):
        return None

    async def direct_reply(self, route, path, headers, query_string, body, hold):
        return self.Reply()

    def direct_done(self, route, status, started):
        pass

    def release(self, hold):
        pass


class _Transport:
    """Records what the protocol writes."""

    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        self.writes.append(bytes(data))

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def _probe() -> str | None:
    """Three requests through a fresh connection of OneWriteProtocol; what went wrong, or None."""
    import uvicorn
    from uvicorn.server import ServerState

    def post(path: bytes, extra: bytes = b"") -> bytes:
        return b"POST " + path + b" HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n" + extra + b"\r\nhi"

    async def exchange(request: bytes) -> tuple[list[bytes], bool]:
        config = uvicorn.Config(_Probe(), http=OneWriteProtocol, lifespan="off", log_config=None,
                                access_log=False, proxy_headers=False)
        config.load()
        state = ServerState()
        state.default_headers = []
        transport = _Transport()
        connection = OneWriteProtocol(config=config, server_state=state, app_state={})
        connection.connection_made(transport)
        connection.data_received(request)
        for _ in range(100):
            await asyncio.sleep(0)
            if not connection.tasks:
                break
        closed = transport.closed  # by the server, before the connection goes
        connection.connection_lost(None)
        return transport.writes, closed

    expected = [
        (post(b"/asgi"), b"asgi", False, False),
        (post(b"/direct"), b"direct", False, False),
        (post(b"/direct", b"connection: close\r\n"), b"direct", True, True),
    ]
    try:
        for request, body, closed, close_header in expected:
            writes, closed_by_server = asyncio.run(exchange(request))
            if len(writes) != 1:
                return f"{request.split(b' ')[1].decode()} was answered in {len(writes)} writes, not 1"
            head, _, got = writes[0].partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 OK") or got != body:
                return f"{request.split(b' ')[1].decode()} was answered {writes[0][:60]!r}"
            if closed_by_server != closed or (b"\r\nconnection: close" in head) != close_header:
                return "a request's Connection: close was not honoured" if closed else "a kept-alive connection closed"
    except Exception as exc:  # a renamed or removed internal
        return f"{type(exc).__name__}: {exc}"
    return None
