"""service.http_protocol: uvicorn's real httptools protocol, each response in one write."""

from __future__ import annotations

import asyncio
import gc

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.http_protocol import SUPPORTED, OneWriteProtocol, protocol


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


def exchange(*chunks: bytes, cls=OneWriteProtocol) -> Transport:
    """Feed request bytes to a fresh connection of the protocol; what it wrote back."""

    async def scenario():
        config = uvicorn.Config(answer, http=protocol() if cls is OneWriteProtocol else cls,
                                log_level="critical", lifespan="off")
        config.load()
        assert config.http_protocol_class is cls
        transport = Transport()
        conn = cls(config=config, server_state=ServerState(), app_state={})
        conn.connection_made(transport)
        for chunk in chunks:
            conn.data_received(chunk)
            for _ in range(20):  # let the request tasks run
                await asyncio.sleep(0)
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        transport.closed_by_server = transport.closed
        conn.connection_lost(None)
        return transport

    return asyncio.run(scenario())


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


def test_installed_uvicorn_takes_the_protocol():
    assert SUPPORTED, "uvicorn's HttpToolsProtocol lost _start_asgi_task: responses take two writes"


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
