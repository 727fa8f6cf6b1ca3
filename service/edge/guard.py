"""Slow, oversized and malformed clients: a request's head must arrive whole within
`header_timeout_seconds` of its first byte and hold at most `max_header_bytes`, as must a
chunked body's trailers; its body may not pause longer than `body_timeout_seconds` between two
reads, and after that first allowance must keep coming at `min_body_rate_bytes` a second on
average. Past those, 431 (too large) or 408 (too slow) and the connection is closed, as a
reverse proxy would (nginx: client_header_timeout, client_body_timeout,
large_client_header_buffers; Node: headersTimeout, maxHeaderSize; Apache: mod_reqtimeout).

uvicorn has none of these (a 1 MiB header line is accepted, and a client sending a byte now and
then holds its connection and buffer for ever), so `guarded(cls)` wraps whichever HTTP protocol
serves (the fast path's or uvicorn's own), through asyncio's public Protocol interface only:
`connection_made`, `data_received`, `connection_lost`. It follows the byte stream's framing
(the head up to its blank line, then a body of Content-Length bytes or of chunks) to know where
each request starts, and hands every byte on unchanged; the protocol's own parser still decides
what the bytes mean. The framing it follows is the grammar and nothing more (a chunk size is 1
to 16 hexadecimal digits: no sign, space or underscore); bytes outside it close the connection
(with a 400 where no other response can be on its way, below), so the guard and the parser
never disagree on where a request ends, and every turn of the loop over client bytes consumes
one or changes state. Blank lines before a request count against its head.

400, 408 and 431 are written only where no other response can be on its way: on a connection's first
request. On a later one (a response to a pipelined request may still be coming) the connection
is closed without one.
"""

from __future__ import annotations

import asyncio
import logging
import re

from service.config import Settings

log = logging.getLogger(__name__)

HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, IDLE, UNGUARDED, REFUSED = range(9)
_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,18})[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*chunked", re.IGNORECASE)
# A chunk-size line (RFC 9112 7.1): hexadecimal digits, then extensions. Nothing else: no sign, no
# space or underscore inside the number (Python's int() takes all three), at most 16 digits.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r?\n")
_OPEN: set = set()  # the process's open HTTP connections (the event loop's thread only)
_WARNED = [0.0]  # when refusing connections was last logged
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def refusal(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with a JSON error body."""
    body = b'{"error": "' + message.encode() + b'"}'
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))) + body


def limits_of(app) -> Settings:
    """The settings of the application under uvicorn's middleware (the Edge has them)."""
    for _ in range(8):
        settings = getattr(app, "settings", None)
        if isinstance(settings, Settings):
            return settings
        app = getattr(app, "app", None)
    return Settings()


def guarded(protocol_class: type) -> type:
    """`protocol_class` with the limits above on every connection."""

    class Guarded(protocol_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            settings = limits_of(self.app)
            self._max_head = settings.max_header_bytes
            self._head_timeout = settings.header_timeout_seconds
            self._body_timeout = settings.body_timeout_seconds
            self._min_rate = settings.min_body_rate_bytes
            self._max_connections = settings.max_connections
            self._body_at, self._body_bytes, self._trailers, self._blank = 0.0, 0, 0, 0
            self._state, self._head, self._left, self._line = HEAD, bytearray(), 0, bytearray()
            self._requests, self._timer, self._transport = 0, None, None
            self._deadline: float | None = None  # when the part of a request now awaited is late
            self._awaited = ""

        def connection_made(self, transport) -> None:
            self._transport, self._clock = transport, asyncio.get_running_loop()
            if len(_OPEN) >= self._max_connections:  # each connection may hold its head and buffers
                if self._clock.time() > _WARNED[0] + 10:  # said once in a while, not per connection
                    _WARNED[0] = self._clock.time()
                    log.warning("refusing connections: %d are open (max_connections)", len(_OPEN))
                self._state = REFUSED
                transport.abort()
                return
            _OPEN.add(self)
            super().connection_made(transport)
            self._expect(self._head_timeout, "its request head")  # a connection that sends nothing too

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self in _OPEN:
                _OPEN.discard(self)
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            state = self._state
            if state == REFUSED:
                return
            if state == IDLE or (state == HEAD and not self._head):
                if not self._whole_request(data):
                    refused = self._follow(data)
                    if refused is not None:
                        return self._refuse(*refused)
            elif state != UNGUARDED:
                refused = self._follow(data)
                if refused is not None:
                    return self._refuse(*refused)
            super().data_received(data)

        def _whole_request(self, data: bytes) -> bool:
            """The common case, followed cheaply: `data` starts a request and holds its whole
            head, and its body or the start of it (nothing after). False: not that case, and
            nothing was followed."""
            end = data.find(b"\r\n\r\n")
            if end < 0 or end + 4 > self._max_head or data.startswith(b"\r\n"):
                return False
            head = data[:end + 2].lower()  # header names are case-insensitive, with no space before ":"
            if b"\r\ntransfer-encoding:" in head:
                return False
            at = head.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                value = head[at + 17:head.find(b"\r\n", at + 17)].strip(b" \t")
                if not (value.isdigit() and len(value) <= 18):
                    return False
                length = int(value)
            left = length - (len(data) - end - 4)
            if left < 0:  # pipelined: another request follows in the same bytes
                return False
            self._requests += 1
            if left:
                self._state, self._left = BODY, left
                self._body_started()
                self._body_bytes = length - left
            else:
                self._state, self._deadline = IDLE, None
            return True

        # -- the framing ---------------------------------------------------------------------

        def _follow(self, data: bytes) -> tuple[int, str] | None:
            """Advance through `data`; (status, message) if the request must be refused. Every
            turn of the loop consumes a byte or changes state; one that does neither is a bug in
            this parser, and the connection is closed rather than the loop spun."""
            i, n = 0, len(data)
            while i < n:
                state, at = self._state, i
                if state == IDLE:  # the first byte of the next request starts its clock
                    self._state, self._head, self._blank = HEAD, bytearray(), 0
                    self._expect(self._head_timeout, "its request head")
                    continue
                if state == HEAD:
                    # The blank line ending the head: across the seam with what came before,
                    # else in this packet (searched from i: linear in the packet, however many
                    # heads it holds).
                    seam = len(self._head[-3:])
                    end = (bytes(self._head[-3:]) + data[i:i + 3]).find(b"\r\n\r\n")
                    if end >= 0:
                        take = end + 4 - seam
                    else:
                        end = data.find(b"\r\n\r\n", i)
                        take = n - i if end < 0 else end + 4 - i
                    self._head += data[i:i + take]
                    i += take
                    if len(self._head) + self._blank > self._max_head:
                        return 431, f"the request head is larger than {self._max_head} bytes"
                    if end >= 0:
                        self._head_done()
                elif state == BODY or state == CHUNK_DATA:
                    take = min(self._left, n - i)
                    self._left -= take
                    i += take
                    self._arrived(take)
                    if self._left == 0:
                        if state == BODY:
                            self._request_done()
                        else:
                            self._state = CHUNK_END
                elif state in (CHUNK_SIZE, CHUNK_END, TRAILERS):
                    end = data.find(b"\n", i)
                    stop = n if end < 0 else end + 1
                    self._line += data[i:stop]
                    self._arrived(stop - i)
                    i = stop
                    if len(self._line) > self._max_head:
                        return 431, f"a chunk header is larger than {self._max_head} bytes"
                    if state == TRAILERS:
                        self._trailers += stop - at
                        if self._trailers > self._max_head:
                            return 431, f"the chunked body's trailers are larger than {self._max_head} bytes"
                    if end >= 0:
                        refused = self._line_done()
                        if refused is not None:
                            return refused
                else:  # UNGUARDED
                    break
                if i <= at and self._state == state:  # no progress: never loop on the same bytes
                    return 400, "the request's framing could not be followed"
            return None

        def _head_done(self) -> None:
            head = bytes(self._head)
            if head.strip(b"\r\n") == b"":  # blank lines before a request: they count against its head
                self._blank += len(head)
                self._head = bytearray()
                return
            self._requests += 1
            if _CHUNKED.search(head):
                self._state, self._line, self._trailers = CHUNK_SIZE, bytearray(), 0
                self._body_started()
                return
            m = _LENGTH.search(head)
            self._left = int(m.group(1)) if m else 0
            if self._left:
                self._state = BODY
                self._body_started()
            else:
                self._request_done()

        def _line_done(self) -> tuple[int, str] | None:
            """A chunk-size line, the CRLF after a chunk's data, or a trailer line has arrived
            whole: move on, or (status, message) if it breaks the grammar."""
            raw, self._line = bytes(self._line), bytearray()
            if self._state == CHUNK_END:  # the CRLF after a chunk's data
                if raw not in (b"\r\n", b"\n"):
                    return 400, "a chunk's data is longer than its size"
                self._state = CHUNK_SIZE
            elif self._state == CHUNK_SIZE:
                m = _CHUNK_SIZE.fullmatch(raw)
                if m is None:
                    return 400, "a chunk size is not a hexadecimal number of at most 16 digits"
                size = int(m.group(1), 16)
                self._state, self._left = (TRAILERS, 0) if size == 0 else (CHUNK_DATA, size)
            elif raw in (b"\r\n", b"\n"):  # TRAILERS: the blank line that ends them
                self._request_done()
            return None

        def _body_started(self) -> None:
            """The body's clock: it must keep coming (no pause over body_timeout_seconds) and,
            past that first allowance, at min_body_rate bytes a second on average."""
            self._body_at, self._body_bytes = self._clock.time(), 0
            self._expect(self._body_timeout, "the rest of its body")

        def _arrived(self, n: int) -> None:
            """n more bytes of the body: the deadline of the next ones."""
            self._body_bytes += n
            pause = self._body_timeout
            if self._min_rate:
                allowed = self._body_at + self._body_timeout + self._body_bytes / self._min_rate
                pause = min(pause, allowed - self._clock.time())
            self._expect(pause, "the rest of its body")

        def _request_done(self) -> None:
            self._state, self._deadline = IDLE, None  # between requests, uvicorn's keep-alive timeout applies

        # -- deadlines and refusals ----------------------------------------------------------

        def _expect(self, seconds: float, what: str) -> None:
            """The part of the request now awaited (`what`) must arrive within `seconds`. One
            timer per connection, re-armed only when it fires early: a request costs no timer."""
            self._deadline, self._awaited = self._clock.time() + seconds, what
            if self._timer is not None and self._timer.when() > self._deadline:  # due sooner now
                self._timer.cancel()
                self._timer = None
            if self._timer is None:
                self._timer = self._clock.call_at(self._deadline, self._check_deadline)

        def _check_deadline(self) -> None:
            self._timer = None
            if self._deadline is None:
                return
            if self._clock.time() >= self._deadline:
                self._refuse(408, f"the client took too long to send {self._awaited}")
            else:
                self._timer = self._clock.call_at(self._deadline, self._check_deadline)

        def _disarm(self) -> None:
            self._deadline = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _refuse(self, status: int, message: str) -> None:
            self._disarm()
            self._state = UNGUARDED
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            if self._requests == 0:  # the first request's head: no response can be on its way
                transport.write(refusal(status, message))
            log.info("closed a connection from %s: %s", transport.get_extra_info("peername"), message)
            transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{protocol_class.__name__}"
    return Guarded
