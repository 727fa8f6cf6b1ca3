"""Malformed framing against a real server, on both HTTP paths: chunk sizes outside the grammar,
chunk data longer than its size, trailers past the head limit. Each request is refused (a 4xx
or a closed connection) within seconds, and the server goes on answering `/healthz` within a
second, on HTTP and on gRPC (they share the event loop that a spinning parser would stop)."""

from __future__ import annotations

import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Settings
from tests.server import grpc_server

CHUNKED = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
MAX_HEAD = Settings().max_header_bytes

MALFORMED = {
    "negative size": CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n",  # the issue's 79 bytes
    "signed size": CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n",
    "space in size": CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n",
    "underscore in size": CHUNKED + b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    "0x prefix": CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    "17 digits": CHUNKED + b"10000000000000000\r\nhello\r\n0\r\n\r\n",
    "empty size": CHUNKED + b"\r\nhello\r\n0\r\n\r\n",
    "data past its size": CHUNKED + b"2\r\nhello\r\n0\r\n\r\n",
    # each line well within the limit, their total twice it
    "trailers past the limit": CHUNKED + b"0\r\n"
    + b"".join(b"x-t%d: %s\r\n" % (i, b"a" * 90) for i in range(2 * MAX_HEAD // 90)) + b"\r\n",
}


@pytest.fixture(scope="module", params=["true", "false"], ids=["fast", "stock"])
def server(request, trained_repository):
    server = grpc_server(trained_repository, env={"ENSEMBLE_HTTP_FAST_PATH": request.param})
    yield server
    server.kill()


def refused(port: int, request: bytes, within: float = 5.0) -> bytes:
    """Send `request` on a fresh connection; what the server sent before it closed the connection
    (within `within` seconds: else the test fails)."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as s:
        try:
            s.sendall(request)
        except OSError:  # closed while we were still sending: refused
            return b""
        got, deadline = b"", time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return got
            if not data:
                return got
            got += data
        raise AssertionError(f"the connection stayed open {within} s after {request[:90]!r}: got {got[:200]!r}")


def assert_answering(server) -> None:
    """/healthz over HTTP and a health check over gRPC, each answered within a second."""
    assert httpx.get(server.base + "/healthz", timeout=1.0).status_code == 200
    with grpc.insecure_channel(server.grpc) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_framing_is_refused_and_the_server_goes_on(server, case):
    got = refused(server.port, MALFORMED[case])
    # refused: a 4xx or nothing at all; never an answer to the request as if it were whole
    assert got == b"" or got.startswith(b"HTTP/1.1 4"), got[:200]
    assert_answering(server)
    assert "Traceback" not in server.output()


def test_the_issues_request_is_79_bytes():
    assert len(MALFORMED["negative size"]) == 79


def test_many_negative_chunk_sizes_at_once_leave_the_server_answering(server):
    conns = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    try:
        for s in conns:
            s.sendall(MALFORMED["negative size"])
        assert_answering(server)
        for s in conns:  # each closed by the server
            try:
                assert s.recv(65536) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in conns:
            s.close()


def test_a_good_chunked_request_with_trailers_within_the_limit_is_answered(server):
    body = b'{"instances": [[' + b",".join([b"[" + b",".join([b"[0]"] * 8) + b"]"] * 8) + b"]]}"
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 100]), body[i:i + 100]) for i in range(0, len(body), 100))
    request = (CHUNKED.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n") + chunks
               + b"0\r\nx-trailer: ok\r\n\r\n")
    got = refused(server.port, request)
    assert got.startswith(b"HTTP/1.1 200 "), got[:300]
    assert b'"predictions"' in got


def test_connections_past_max_connections_are_closed_as_they_open(trained_repository):
    from tests.server import ServerProcess

    server = ServerProcess(trained_repository, env={"ENSEMBLE_MAX_CONNECTIONS": "20"}).start()
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(19)]
    try:  # 19 open and silent, plus the readiness client's: the 21st is closed at once
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert extra.recv(4096) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            extra.close()
        held.pop().close()
        deadline = time.monotonic() + 5  # a place is free again once the server saw the close
        while True:
            try:
                assert httpx.get(server.base + "/healthz", timeout=1).status_code == 200
                break
            except (httpx.TransportError, AssertionError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert "refusing connections: 20 are open" in server.output()
    finally:
        for s in held:
            s.close()
        server.kill()
