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

Pass `http=protocol()` to uvicorn: this module's protocol, or, where the installed uvicorn lacks
the hook it relies on, uvicorn's own choice with a warning.
"""

from __future__ import annotations

import logging

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


if HttpToolsProtocol is not None and hasattr(HttpToolsProtocol, "_start_asgi_task"):

    class OneWriteProtocol(HttpToolsProtocol):
        """HttpToolsProtocol whose request cycles write each response once."""

        def _start_asgi_task(self, cycle, app) -> None:
            cycle.transport = OneWriteTransport(self.transport, cycle)
            super()._start_asgi_task(cycle, app)

    SUPPORTED = True
else:  # pragma: no cover - depends on the installed uvicorn
    OneWriteProtocol = HttpToolsProtocol
    SUPPORTED = False


def protocol() -> str:
    """The `http` option for uvicorn: this module's protocol, or uvicorn's choice where the
    installed uvicorn cannot take it."""
    if SUPPORTED:
        return PROTOCOL
    log.warning("uvicorn's httptools protocol has no _start_asgi_task here; responses are written "
                "in two writes (install httptools and uvicorn>=0.30)")
    return "auto"
