"""Slow and oversized clients (service.edge.guard), on both HTTP paths: a head too large is a 431,
a head or a body too slow is a 408 or a close, and a few hundred stalled connections neither
slow a normal client down nor stay open."""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest

from tests.server import ServerProcess
from tests.test_fast_http import exchange, post

STALLED = 300


@pytest.mark.parametrize("path", ["fast", "stock"])
def test_a_head_over_the_limit_is_431_and_the_connection_closed(path):
    from service.edge import fast_http

    cls = fast_http.GuardedOneWriteProtocol if path == "fast" else fast_http.GuardedStockProtocol
    head = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n"
    t = exchange(head[:5000], head[5000:], cls=cls)
    assert t.writes and t.writes[0].startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert b"larger than 16384 bytes" in t.writes[0] and t.closed_by_server


@pytest.mark.parametrize("path", ["fast", "stock"])
def test_bodies_and_pipelined_requests_pass_the_guard_unchanged(path):
    from service.edge import fast_http

    cls = fast_http.GuardedOneWriteProtocol if path == "fast" else fast_http.GuardedStockProtocol
    chunked = (b"POST /other HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: x\r\n\r\n")
    stream = post("/other", b"x" * 100) + chunked + b"\r\n" + post("/other", b"last")
    t = exchange(*[stream[i:i + 7] for i in range(0, len(stream), 7)], cls=cls)  # 7 bytes at a time
    responses = b"".join(t.writes).split(b"HTTP/1.1 ")[1:]  # the stock protocol writes head and body apart
    assert [r.partition(b"\r\n\r\n")[2] for r in responses] == [b"x" * 100, b"abcde", b"last"]
    assert not t.closed_by_server


@pytest.mark.parametrize("path", ["fast", "stock"])
def test_blank_lines_count_against_the_head_and_cost_linear_time(path):
    """A packet of 1 MiB of blank lines: refused 431 once they pass the head limit, in one pass
    over the bytes (the head search went back over the rest of the packet at each blank line:
    quadratic, seconds of the event loop per MiB)."""
    from service.edge import fast_http

    cls = fast_http.GuardedOneWriteProtocol if path == "fast" else fast_http.GuardedStockProtocol
    started = time.perf_counter()
    t = exchange(b"\r\n\r\n" * (1 << 18), cls=cls)
    assert time.perf_counter() - started < 1.0
    assert t.writes and t.writes[0].startswith(b"HTTP/1.1 431 ") and t.closed_by_server
    # a few blank lines before a request are allowed, as HTTP/1.1 says
    t = exchange(b"\r\n\r\n" + post("/other", b"abc"), cls=cls)
    assert b"".join(t.writes).endswith(b"abc") and not t.closed_by_server


def stalled_connections(port: int, n: int, body: bool) -> list[socket.socket]:
    """n connections that start a request and stop: mid-head, or mid-body."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if body:
            s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"instances\"")
        else:
            s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-")
        conns.append(s)
    return conns


def latencies(client: httpx.Client, n: int) -> np.ndarray:
    one_row = {"instances": [[[[0]] * 8] * 8]}
    out = []
    for _ in range(n):
        started = time.perf_counter()
        assert client.post("/predict", json=one_row).status_code == 200
        out.append(time.perf_counter() - started)
    return np.array(out)


def closed_by_server(conns: list[socket.socket], within: float) -> tuple[int, int]:
    """(closed, answered 408) of the connections, waiting up to `within` seconds for each."""
    closed = answered = 0
    deadline = time.monotonic() + within
    for s in conns:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(4096)
            while data and not data.endswith(b"}"):
                more = s.recv(4096)
                if not more:
                    break
                data += more
            answered += data.startswith(b"HTTP/1.1 408 ")
            closed += s.recv(1) == b"" if data else 1
        except (TimeoutError, OSError):
            pass
        finally:
            s.close()
    return closed, answered


@pytest.mark.slow
@pytest.mark.parametrize("fast_path", ["true", "false"])
def test_stalled_clients_are_closed_and_do_not_slow_a_normal_client(trained_repository, fast_path):
    server = ServerProcess(trained_repository, env={
        "ENSEMBLE_HTTP_FAST_PATH": fast_path, "ENSEMBLE_HEADER_TIMEOUT_SECONDS": "3",
        "ENSEMBLE_BODY_TIMEOUT_SECONDS": "3"}).start()
    try:
        with httpx.Client(base_url=server.base, timeout=10) as client:
            latencies(client, 200)  # warm
            calm = latencies(client, 1000)
            heads = stalled_connections(server.port, STALLED, body=False)
            bodies = stalled_connections(server.port, 20, body=True)
            stalled = latencies(client, 1000)
            opened = time.monotonic()
            heads_closed, heads_408 = closed_by_server(heads, within=10)
            bodies_closed, _ = closed_by_server(bodies, within=10)
            waited = time.monotonic() - opened
        p99_calm, p99_stalled = np.percentile(calm, 99) * 1000, np.percentile(stalled, 99) * 1000
        print(f"\n[figures] slow clients ({'fast path' if fast_path == 'true' else 'stock'}): p99 calm "
              f"{p99_calm:.2f} ms, with {STALLED} stalled heads and 20 stalled bodies {p99_stalled:.2f} ms "
              f"({p99_stalled / p99_calm:.2f}x); closed {heads_closed}/{STALLED} heads ({heads_408} with a 408) "
              f"and {bodies_closed}/20 bodies within {waited:.1f} s")
        assert p99_stalled <= 2 * p99_calm, (p99_calm, p99_stalled)
        assert heads_closed == STALLED and heads_408 == STALLED
        assert bodies_closed == 20
        assert "Traceback" not in server.output()
    finally:
        server.kill()


@pytest.fixture(scope="module", params=["true", "false"], ids=["fast", "stock"])
def small_budget_server(request, trained_repository):
    """A server whose bytes in flight are small enough for a few idle clients to fill them if
    declared lengths were reserved before their bytes came."""
    server = ServerProcess(trained_repository, env={
        "ENSEMBLE_HTTP_FAST_PATH": request.param, "ENSEMBLE_MAX_BODY_BYTES": str(1 << 20),
        "ENSEMBLE_MAX_INFLIGHT_BYTES": str(4 << 20), "ENSEMBLE_MAX_INFLIGHT_BYTES_PER_PEER": str(4 << 20),
        "ENSEMBLE_BODY_TIMEOUT_SECONDS": "2", "ENSEMBLE_MIN_BODY_RATE_BYTES": "4096"}).start()
    yield server
    server.kill()


def declared_and_silent(port: int, n: int, length: int) -> list[socket.socket]:
    """n connections that declare a body of `length` bytes and send none of it."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % length)
        conns.append(s)
    return conns


def test_declared_lengths_hold_nothing_until_their_bytes_come(small_budget_server):
    server = small_budget_server
    one_row = {"instances": [[[[0]] * 8] * 8]}
    large = {"instances": [[[[0.5]] * 8] * 8] * 400}  # ~200 KiB: counted in the main budget
    idle = declared_and_silent(server.port, 300, 64 * 1024)  # 19 MiB declared against a 16 MiB pool
    idle += declared_and_silent(server.port, 8, 1 << 20)  # 8 MiB declared against a 4 MiB budget
    try:
        with httpx.Client(base_url=server.base, timeout=10) as client:
            for _ in range(5):
                answer = client.post("/predict", json=one_row)
                assert answer.status_code == 200, answer.text
                answer = client.post("/predict", json=large)
                assert answer.status_code == 200, answer.text
    finally:
        for s in idle:
            s.close()


def test_a_body_trickled_slower_than_the_minimum_rate_is_closed(small_budget_server):
    """One byte every 0.3 s never pauses past the 2 s body timeout; the minimum rate (4096 B/s
    after the first 2 s) closes it all the same, within seconds."""
    s = socket.create_connection(("127.0.0.1", small_budget_server.port), timeout=1)
    s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 65536\r\n\r\n{")
    started = time.monotonic()
    closed_after = None
    try:
        while time.monotonic() - started < 15:
            try:
                s.sendall(b" ")
            except OSError:
                closed_after = time.monotonic() - started
                break
            try:
                if s.recv(4096) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
            time.sleep(0.3)  # the trickle itself, not a synchronisation
    finally:
        s.close()
    assert closed_after is not None, "a body trickled at ~3 bytes a second was kept open for 15 s"
    assert closed_after < 8, closed_after
    with httpx.Client(base_url=small_budget_server.base, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
