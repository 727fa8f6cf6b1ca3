"""service.edge.fast_http: uvicorn's real httptools protocol, each response in one write, and
the direct lane."""

from __future__ import annotations

import asyncio
import gc

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.config import Settings
from service.edge.fast_http import GuardedOneWriteProtocol, OneWriteProtocol, check, path_in_use, protocol


class Transport:
    """Records what the protocol writes to the connection."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data):
        self.writes.append(bytes(data))

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


async def answer(scope, receive, send):
    """Echoes the body; `/stream` answers in two chunks, `/fail` breaks after the head."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body) or 2).encode())]})
    if scope["path"] == "/fail":
        raise RuntimeError("broken after the head")
    await send({"type": "http.response.body", "body": body or b"ok"})


class Reply:
    def __init__(self, status: int, body: bytes, headers=()):
        self.status, self.body, self.content_type, self.headers = status, body, b"text/plain", list(headers)

    def head(self):
        return [(b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode()),
                *self.headers]


class Lane:
    """An application with direct routes (as service.edge.asgi.Edge): POSTs under /direct
    are answered by `direct_reply`, everything else by `answer`."""

    def __init__(self, fail: bool = False, budget: int = 10_000):
        self.app = answer
        self.fail, self.budget = fail, budget
        self.calls: list[tuple] = []
        self.done: list[tuple] = []
        self.released: list[tuple] = []
        self.held: list[int] = []  # the sizes hold_body was asked to cover, in order

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)

    def direct_route(self, path):
        return ("/direct", path) if path.startswith("/direct") else None

    def admit(self, length, peer):
        return ("hold", length) if length <= 1000 else None

    def hold_body(self, hold, path, size):
        self.held.append(size)
        return None if size <= self.budget else Reply(429, b"busy")

    async def direct_reply(self, route, path, headers, query_string, body, hold):
        self.calls.append((route, path, headers, query_string, body))
        await asyncio.sleep(0)  # as a batched request would: the answer comes later
        if self.fail:
            raise RuntimeError("a bug in the lane")
        return Reply(201, b"direct:" + body, [(b"x-lane", b"1")])

    def direct_done(self, route, status, started):
        self.done.append((route, status))

    def release(self, hold):
        self.released.append(hold)


def exchange(*chunks: bytes, cls=GuardedOneWriteProtocol, app=answer, access_log=False, **options) -> Transport:
    """Feed request bytes to a fresh connection of the protocol; what it wrote back."""

    async def scenario():
        config = uvicorn.Config(app, http=protocol(Settings()) if cls is GuardedOneWriteProtocol else cls,
                                log_level="critical", lifespan="off", access_log=access_log,
                                **options)
        config.load()
        assert config.http_protocol_class is cls
        transport = Transport()
        state = ServerState()
        state.default_headers = [(b"server", b"uvicorn")]  # as uvicorn's Server sets them
        conn = cls(config=config, server_state=state, app_state={})
        conn.connection_made(transport)
        for chunk in chunks:
            conn.data_received(chunk)
            for _ in range(20):  # let the request tasks run
                await asyncio.sleep(0)
        for _ in range(10_000):  # and the pipelined ones, each started as the one before ends
            if not conn.tasks and not conn.pipeline:
                break
            await asyncio.sleep(0)
        transport.closed_by_server = transport.closed
        conn.connection_lost(None)
        return transport

    return asyncio.run(scenario())


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


def test_installed_uvicorn_takes_the_protocol():
    assert check() is None, f"the fast path's start-up check failed: {check()}"
    assert path_in_use(Settings()) == "fast" and protocol(Settings()) == "service.edge.fast_http:GuardedOneWriteProtocol"
    stock = protocol(Settings(http_fast_path=False))
    assert path_in_use(Settings(http_fast_path=False)) == "stock" and stock == "service.edge.fast_http:GuardedStockProtocol"
    # stock is uvicorn's own protocol (behind the limits of service.edge.guard), not the fast path's
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    import service.edge.fast_http as fast_http

    assert fast_http.GuardedStockProtocol.__mro__[1] is HttpToolsProtocol
    assert not issubclass(fast_http.GuardedStockProtocol, OneWriteProtocol)


def test_a_failed_check_serves_on_uvicorns_own_protocol_after_one_warning(monkeypatch, caplog):
    import service.edge.fast_http as fast_http

    monkeypatch.setattr(fast_http, "_probe", lambda: "AttributeError: 'RequestResponseCycle' has no 'flow'")
    fast_http.check.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="service.edge.fast_http"):
            for _ in range(3):
                assert path_in_use(Settings()) == "stock" and protocol(Settings()) == "service.edge.fast_http:GuardedStockProtocol"
        warnings = [r for r in caplog.records if "uvicorn's own protocol" in r.getMessage()]
        assert len(warnings) == 1 and "has no 'flow'" in warnings[0].getMessage()
    finally:
        fast_http.check.cache_clear()


def test_head_and_body_leave_in_one_write():
    t = exchange(post("/predict", b'{"x": 1}'))
    assert len(t.writes) == 1
    head, _, body = t.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 8" in head
    assert body == b'{"x": 1}'


def test_pipelined_requests_get_one_write_each_in_order():
    t = exchange(post("/a", b"first") + post("/b", b"second"))
    assert [w.partition(b"\r\n\r\n")[2] for w in t.writes] == [b"first", b"second"]


def test_head_request_is_answered_without_a_body_write():
    t = exchange(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK")
    assert t.writes[0].endswith(b"\r\n\r\n")


def test_100_continue_is_not_held_back():
    body = b'{"x": 2}'
    head = post("/predict", b"", b"expect: 100-continue\r\n").replace(b"content-length: 0", b"content-length: 8")
    t = exchange(head, body)
    assert t.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert len(t.writes) == 2 and t.writes[1].endswith(body)


def test_streamed_response_sends_the_head_with_the_first_chunk():
    t = exchange(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.writes[0].endswith(b"3\r\none\r\n")
    assert b"".join(t.writes[1:]) == b"3\r\ntwo\r\n0\r\n\r\n"


def test_a_response_broken_after_its_head_still_sends_the_head_then_closes():
    t = exchange(post("/fail", b"abc"))
    assert t.closed_by_server
    assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("path", ["/predict", "/stream"])
def test_keep_alive_connection_stays_open(path):
    t = exchange(post(path, b"1"))
    assert not t.closed_by_server


def test_answered_requests_leave_no_garbage_cycles_behind():
    """A cycle per request would make the collector stall the loop (p99 18 ms on a bare route)."""

    def garbage(cls) -> int:
        gc.collect()
        gc.disable()
        try:
            exchange(b"".join(post("/a", b"x") for _ in range(50)), cls=cls)
            return gc.collect()
        finally:
            gc.enable()

    plain, ours = garbage(HttpToolsProtocol), garbage(OneWriteProtocol)
    assert ours <= plain + 10, (ours, plain)


# -- the direct lane: plain POSTs on the application's direct routes, without ASGI ---------------


def test_direct_route_is_answered_by_the_lane_in_one_write():
    lane = Lane()
    t = exchange(post("/direct/x?members=1", b"abc"), app=lane)
    assert len(lane.calls) == 1
    route, path, headers, query, body = lane.calls[0]
    assert (route, path, query, body) == (("/direct", "/direct/x"), "/direct/x", b"members=1", b"abc")
    assert (b"content-length", b"3") in headers
    assert lane.done == [(("/direct", "/direct/x"), 201)]
    assert lane.released == [("hold", 3)]  # what was admitted is given back
    assert lane.held and lane.held[-1] == 3  # the body's bytes were held before it was answered
    assert len(t.writes) == 1 and not t.closed_by_server
    head, _, body = t.writes[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 201 Created"
    assert b"content-type: text/plain" in lines and b"content-length: 10" in lines and b"x-lane: 1" in lines
    assert any(line.startswith(b"server: uvicorn") for line in lines)  # uvicorn's default headers too
    assert body == b"direct:abc"


def test_direct_route_with_connection_close_is_answered_then_closed():
    t = exchange(post("/direct", b"abc", b"connection: close\r\n"), app=Lane())
    assert t.closed_by_server
    assert b"\r\nconnection: close\r\n" in t.writes[0] and t.writes[0].endswith(b"direct:abc")


def test_direct_body_in_several_packets_is_answered_once_complete():
    request = post("/direct", b"0123456789")
    lane = Lane()
    t = exchange(request[:-7], request[-7:-3], request[-3:], app=lane)
    assert [c[4] for c in lane.calls] == [b"0123456789"]
    assert len(t.writes) == 1 and t.writes[0].endswith(b"direct:0123456789")


def test_direct_body_is_held_as_it_arrives_and_refused_mid_body_the_rest_discarded():
    request = post("/direct", b"x" * 900)
    lane = Lane(budget=500)  # the bytes in flight allow 500: the body passes them half-way
    t = exchange(request[:-800], request[-800:-400], request[-400:] + post("/other", b"next"), app=lane)
    assert lane.calls == []  # never answered as if whole
    assert lane.held[0] < 900 and lane.held[-1] > 500  # counted as the bytes came, refused past 500
    assert t.writes[0].startswith(b"HTTP/1.1 429 ") and t.writes[0].endswith(b"busy")
    assert t.writes[-1].endswith(b"next") and not t.closed_by_server  # the rest discarded, the next served
    assert lane.released == [("hold", 900)]


def test_pipelined_direct_and_asgi_requests_are_answered_in_order():
    lane = Lane()
    t = exchange(post("/direct", b"one") + post("/other", b"two") + post("/direct", b"three"), app=lane)
    assert [w.partition(b"\r\n\r\n")[2] for w in t.writes] == [b"direct:one", b"two", b"direct:three"]
    assert len(lane.done) == 2


@pytest.mark.parametrize("request_bytes", [
    post("/other", b"abc"),  # not a direct route
    b"GET /direct HTTP/1.1\r\nhost: x\r\n\r\n",  # not a POST
    post("/direct", b"x" * 1001),  # over the lane's body limit: the ASGI path refuses it
    b"POST /direct HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
], ids=["other-path", "get", "over-limit", "chunked"])
def test_other_requests_take_the_asgi_path(request_bytes):
    lane = Lane()
    t = exchange(request_bytes, app=lane)
    assert lane.calls == [] and len(t.writes) == 1
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK")


def test_expect_100_continue_takes_the_asgi_path():
    lane = Lane()
    head = post("/direct", b"", b"expect: 100-continue\r\n").replace(b"content-length: 0", b"content-length: 3")
    t = exchange(head, b"abc", app=lane)
    assert lane.calls == [] and t.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert t.writes[1].endswith(b"abc")


def test_with_an_access_log_every_request_takes_the_asgi_path():
    lane = Lane()
    exchange(post("/direct", b"abc"), app=lane, access_log=True)
    assert lane.calls == []


def test_a_failing_lane_costs_one_500_not_the_connection():
    lane = Lane(fail=True)
    t = exchange(post("/direct", b"abc") + post("/other", b"after"), app=lane)
    assert t.writes[0].startswith(b"HTTP/1.1 500 Internal Server Error")
    assert b"connection: close" in t.writes[0] and t.closed_by_server
    assert lane.released == [("hold", 3)]  # a failed answer gives back what it held too


def test_direct_answers_leave_no_garbage_cycles_behind():
    def garbage(app) -> int:
        gc.collect()
        gc.disable()
        try:
            path = "/direct" if app is not answer else "/a"
            exchange(b"".join(post(path, b"x") for _ in range(50)), app=app)
            return gc.collect()
        finally:
            gc.enable()

    plain, direct = garbage(answer), garbage(Lane())
    assert direct <= plain + 10, (direct, plain)
