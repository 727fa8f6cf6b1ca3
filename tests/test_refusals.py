"""Refusals a real server decides itself, where no client library can answer in its place: a gRPC
call whose queue deadline passes is DEADLINE_EXCEEDED from the service's own queue (counted as
such), and HTTP bodies that fill the bytes in flight make the next large request a 429.

gRPC's core ends a call at the client's deadline by itself (the handler is cancelled, the service
never sees its deadline pass), so the service's own deadline shows only where the client set
none, or set one longer than the server's default: with a default queue deadline of 1 ms, a call
without a deadline expires in the queue, and a call whose client allows a minute is served."""

from __future__ import annotations

import re
import socket
import threading
import time

import grpc
import httpx
import numpy as np
import orjson

from tests.server import ServerProcess, grpc_server


def sample(server, name: str, labels: str = "") -> float:
    """The value of the sample `name{labels}` in the server's exposition (0 if absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    return next((float(line[len(prefix):]) for line in server.client.get("/metrics").text.splitlines()
                 if line.startswith(prefix)), 0.0)


def test_grpc_calls_expire_in_the_servers_queue_on_the_servers_deadline(trained_repository, digits_test_split):
    """Behind 4,000 queued one-row batches, calls of both protocols that set no deadline get the
    default (1 ms) and are refused by the queue (its message, its counter); the call that set a
    deadline of a minute is served whole, though the default would have expired it."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    from tritonclient.grpc import service_pb2_grpc

    from tests.test_answers import model_infer_request
    from tests.test_grpc_tfs import predict_request

    server = grpc_server(trained_repository, env={"ENSEMBLE_MAX_BATCH_SIZE": "1", "ENSEMBLE_REQUEST_TIMEOUT_MS": "1"})
    channel = grpc.insecure_channel(server.grpc)
    try:
        v2 = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        tfs = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict

        one_row = digits_test_split.x[:1].astype("float32")
        big = np.resize(digits_test_split.x, (4000, 8, 8, 1))

        def long_call(outcome: list) -> None:
            try:
                outcome.append(v2(model_infer_request(big), timeout=60))
            except grpc.RpcError as exc:
                outcome.append(exc)

        expired: dict[str, str] = {}
        for _ in range(5):  # rounds, until a call of each protocol expired behind the long one
            outcome: list = []
            caller = threading.Thread(target=long_call, args=(outcome,))
            caller.start()
            try:
                while caller.is_alive() and sample(server, "ensemble_queue_depth_rows") < 1000:
                    pass  # each look is a request to /metrics
                if caller.is_alive():  # 1,000 rows or more wait: both calls queue behind them
                    calls = {"v2": v2.future(model_infer_request(one_row)), "tfs": tfs.future(predict_request(one_row))}
                    for protocol, call in calls.items():
                        try:  # sent without a deadline (the server's default applies), waited for 30 s
                            call.result(timeout=30)
                        except grpc.RpcError as exc:
                            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.details()
                            expired[protocol] = exc.details()
            finally:
                caller.join(60)
            assert not isinstance(outcome[0], grpc.RpcError), outcome[0]  # the minute it was allowed
            assert len(outcome[0].raw_output_contents[0]) == 4000 * 10 * 4  # all its rows answered
            if len(expired) == 2:
                break
        assert set(expired) == {"v2", "tfs"}, f"no call expired in the queue: {expired}"
        for details in expired.values():
            assert "deadline passed after" in details and "it was not computed" in details, details
        assert sample(server, "ensemble_rejected_requests_total", 'reason="deadline"') >= 2
        for route in ("/inference.GRPCInferenceService/ModelInfer", "/tensorflow.serving.PredictionService/Predict"):
            assert sample(server, "ensemble_requests_total", f'protocol="grpc",route="{route}",status="504"') >= 1
    finally:
        channel.close()
        server.kill()


LARGE = 120_000  # above the small-body pool's 64 KiB: counted against max_inflight_bytes
BUDGET = 400_000  # three held bodies fit, a fourth large one does not


def predict_body(rows: np.ndarray, size: int) -> bytes:
    """A valid /predict body of exactly `size` bytes (JSON, padded with trailing spaces)."""
    body = orjson.dumps({"instances": rows.astype(int).tolist()})
    assert len(body) <= size
    return body + b" " * (size - len(body))


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-response"
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def test_bodies_held_fill_the_bytes_in_flight_and_the_next_large_request_is_429(trained_repository,
                                                                                digits_test_split):
    """Three bodies of 120,000 bytes sent whole but their last byte, each from a client address of
    its own, hold the bytes in flight (400,000): a fourth large request is 429 with Retry-After
    and says so, until the three are finished and answered; then it is served."""
    server = ServerProcess(trained_repository, env={"ENSEMBLE_MAX_BODY_BYTES": "300000",
                                                    "ENSEMBLE_MAX_INFLIGHT_BYTES": str(BUDGET)}).start()
    held: list[socket.socket] = []
    try:
        body = predict_body(digits_test_split.x[:300], LARGE)
        for peer in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port), source_address=(f"127.0.0.{2 + peer}", 0))
            sock.settimeout(30)
            sock.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % LARGE + body[:-1])
            held.append(sock)
        probe = predict_body(digits_test_split.x[:250], 100_000)
        deadline_seconds = 10.0  # the held bytes are counted once the server has read them
        with httpx.Client(base_url=server.base, timeout=30) as client:
            until = time.monotonic() + deadline_seconds
            while True:
                refused = client.post("/predict", content=probe, headers={"content-type": "application/json"})
                if refused.status_code == 429 or time.monotonic() > until:
                    break
                assert refused.status_code == 200, refused.text
            assert refused.status_code == 429, f"not refused within {deadline_seconds} s: {refused.text}"
            assert refused.headers["retry-after"] == "1"
            message = refused.json()["error"]
            assert re.search(rf"the server holds \d+ bytes of request.*would pass the limit of {BUDGET}", message), message
            assert sample(server, "ensemble_rejected_requests_total", 'reason="bytes_in_flight"') >= 1
            for sock in held:  # the last byte: each body complete, each answered
                sock.sendall(body[-1:])
            for sock in held:
                status, answer = read_response(sock)
                assert status == 200 and len(orjson.loads(answer)["predictions"]) == 300, answer[:200]
            served = client.post("/predict", content=probe, headers={"content-type": "application/json"})
            assert served.status_code == 200 and len(served.json()["predictions"]) == 250, served.text
    finally:
        for sock in held:
            sock.close()
        server.kill()
