"""Fuzzing the raw byte stream of both HTTP paths (Hypothesis): requests built from HTTP/1.1's
grammar with its parts broken (lengths signed, huge, repeated or wrong; chunk sizes outside the
hexadecimal grammar; chunk data longer or shorter than its size; trailers; pipelined requests;
stray bytes), cut into packets at arbitrary places, sent to a real server.

What must hold, for every stream: the server goes on answering `/healthz` within a second (no
loop over client bytes stops the event loop), nothing it sends is a 5xx, and every connection is
answered and closed, or closed, within its deadlines (the head and body timeouts, and uvicorn's
keep-alive for one left idle after its answers). `make test` runs a short budget of examples on
each path; the slow suite a long one."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server import ServerProcess

TIMEOUTS = {"ENSEMBLE_HEADER_TIMEOUT_SECONDS": "0.5", "ENSEMBLE_BODY_TIMEOUT_SECONDS": "0.5"}
KEEP_ALIVE = 5.0  # uvicorn's default: how long a connection idle after its answers stays open
FAST_EXAMPLES, SLOW_EXAMPLES = 120, 1500

PATHS = [b"/predict", b"/v1/models/digits:predict", b"/v2/models/digits/infer", b"/healthz", b"/models",
         b"/v2/models/digits/versions/1/infer", b"/%00", b"/" + b"a" * 300]
METHODS = [b"POST", b"GET", b"PUT", b"HEAD", b"OPTIONS", b"POST ", b"P\x00ST"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b""]
BODIES = [b"", b'{"instances": [[[[0]]]]}', b'{"instances": ' + b"[" * 64, b'{"inputs": []}',
          b'{"instances": [' + b",".join([b"[" + b",".join([b"[0]"] * 8) + b"]"] * 8) + b"]}", b"\xff\xfe", b"{}"]
# What a chunk-size line may hold, grammar or not: digits, signs, spaces, underscores, prefixes.
SIZE_TOKENS = st.sampled_from([b"5", b"-5", b"0", b"+5", b"1", b" 5", b"a", b"1_0", b"F", b"0x5", b"10", b"",
                               b"5 ", b"ffffffffffffffff", b"10000000000000000", b"5;ext=1", b"5;" + b"e" * 100,
                               b"\t5", b"5\x00", b"-1"])
LENGTHS = st.sampled_from([b"0", b"1", b"5", b"24", b"100", b"-5", b"+5", b" 5", b"5 5", b"1e3", b"0x10",
                           b"99999999999999999999", b"18446744073709551617", b""])


@st.composite
def chunked_body(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        token = draw(SIZE_TOKENS)
        data = draw(st.sampled_from([b"", b"hello", b"x" * 16, b"abc\r\n"]))
        out += token + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"])) + data + b"\r\n"
    if draw(st.booleans()):
        out += b"0\r\n"
        for _ in range(draw(st.integers(0, 3))):
            out += b"x-trailer: " + b"t" * draw(st.sampled_from([1, 100, 5000])) + b"\r\n"
        out += b"\r\n"
    return out


@st.composite
def request(draw) -> bytes:
    line = draw(st.sampled_from(METHODS)) + b" " + draw(st.sampled_from(PATHS)) + b" " + draw(st.sampled_from(VERSIONS))
    headers = [b"host: x"]
    framing = draw(st.sampled_from(["chunked", "length", "chunked", "both", "none", "chunked", "two lengths"]))
    body = draw(st.sampled_from(BODIES))
    if framing in ("length", "both", "two lengths"):
        declared = draw(st.sampled_from([b"exact", b"short", b"long"]) | LENGTHS)
        value = {b"exact": str(len(body)).encode(), b"short": str(max(0, len(body) - 3)).encode(),
                 b"long": str(len(body) + 10).encode()}.get(declared, declared)
        headers.append(b"content-length: " + value)
        if framing == "two lengths":
            headers.append(b"content-length: " + draw(LENGTHS))
    if framing in ("chunked", "both"):
        headers.append(b"transfer-encoding: " + draw(st.sampled_from([b"chunked", b"chunked", b"gzip, chunked",
                                                                      b"chunked, gzip", b" chunked", b"CHUNKED"])))
        body = draw(chunked_body())
    for _ in range(draw(st.integers(0, 2))):
        headers.append(draw(st.sampled_from([b"x-request-timeout-ms: -1", b"expect: 100-continue",
                                             b"connection: close", b"content-type: application/octet-stream",
                                             b"inference-header-content-length: 5", b"bad header", b": x",
                                             b"x-long: " + b"a" * 20_000])))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    return line + eol + eol.join(headers) + eol + eol + body


@st.composite
def stream(draw) -> list[bytes]:
    """A connection's bytes (one to three requests, perhaps stray bytes), cut into packets."""
    data = b"".join(draw(st.lists(request(), min_size=1, max_size=3)))
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]) if data[a:b]]


@pytest.fixture(scope="module", params=["true", "false"], ids=["fast", "stock"])
def server(request, trained_repository):
    server = ServerProcess(trained_repository, env={"ENSEMBLE_HTTP_FAST_PATH": request.param, **TIMEOUTS}).start()
    yield server
    server.kill()


def fuzz(server: ServerProcess, examples: int) -> None:
    opened: list[socket.socket] = []
    received: list[bytes] = []
    health = httpx.Client(base_url=server.base, timeout=1.0)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
    @given(stream())
    def one(packets: list[bytes]) -> None:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=2)
        opened.append(s)
        try:
            for packet in packets:
                s.sendall(packet)
        except OSError:  # closed by the server while we sent: a refusal
            pass
        assert health.get("/healthz").status_code == 200  # within a second: the loop goes on

    try:
        one()
        # Every connection answered and closed, or closed, within its deadlines.
        deadline = time.monotonic() + KEEP_ALIVE + 2 * 0.5 + 5
        open_left = []
        for s in opened:
            got = b""
            try:
                while True:
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    data = s.recv(65536)
                    if not data:
                        break
                    got += data
            except (ConnectionResetError, BrokenPipeError):
                pass
            except TimeoutError:
                open_left.append(got[:200])
            received.append(got)
        assert not open_left, f"{len(open_left)} connections still open past every deadline: {open_left[:3]}"
        answers = [line for got in received for line in got.split(b"\r\n") if line.startswith(b"HTTP/1.")]
        assert not [a for a in answers if a[9:10] == b"5"], answers
        assert answers, "no stream got any answer: the fuzzer does not reach the server's parsers"
        assert health.get("/healthz").status_code == 200
        assert "Traceback" not in server.output()
    finally:
        for s in opened:
            s.close()
        health.close()


def test_fuzzed_byte_streams_are_answered_or_closed_and_the_server_goes_on(server):
    fuzz(server, FAST_EXAMPLES)


@pytest.mark.slow
def test_a_long_fuzz_of_byte_streams(server):
    fuzz(server, SLOW_EXAMPLES)
