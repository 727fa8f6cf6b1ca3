"""The gRPC server against a real `ensemble-serve` process, with real clients: tritonclient's
gRPC client (health, metadata, raw infer, per-member and uncertainty outputs), its protocol stubs
for typed contents, grpc's health and reflection stubs; answers agree with POST /predict, and the
errors of the HTTP suite get the matching gRPC status.

tritonclient brings its own definitions of the `inference` protocol, so this test process never
imports the service's (service.protocols.gen): the two would clash in protobuf's default pool."""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import free_port
from tests.server import ServerProcess, grpc_server


@pytest.fixture(scope="module")
def served(trained_repository, tmp_path_factory):
    server = grpc_server(trained_repository, tmp_path_factory.mktemp("grpc") / "models")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def rows(digits_test_split):
    return digits_test_split.x[:12].astype("float32")


def infer_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("instances", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_metadata_and_readiness_through_tritonclient(served):
    client = triton.InferenceServerClient(served.grpc)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and not client.is_model_ready("nope")
    assert client.get_server_metadata().name == "ensemble-serving"
    meta = client.get_model_metadata("digits")
    assert [i.name for i in meta.inputs] == ["instances"] and list(meta.inputs[0].shape) == [-1, 8, 8, 1]
    assert [o.name for o in meta.outputs] == ["probabilities", "members", "entropy", "expected_entropy",
                                              "mutual_information", "abstain"]


def test_raw_infer_agrees_with_post_predict(served, rows):
    http = httpx.post(f"{served.base}/predict?members=true&uncertainty=true",
                      json={"instances": rows.tolist()}, timeout=30).json()
    client = triton.InferenceServerClient(served.grpc)
    wanted = [triton.InferRequestedOutput(n) for n in ("probabilities", "members", "mutual_information", "abstain")]
    result = client.infer("digits", [infer_input(rows)], outputs=wanted, request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), http["predictions"], atol=1e-6)
    members = np.stack([http["members"][name] for name in http["members"]], axis=1)
    np.testing.assert_allclose(result.as_numpy("members"), members, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("mutual_information"), http["uncertainty"]["mutual_information"],
                               atol=1e-6)
    assert result.as_numpy("abstain").tolist() == http["abstain"]
    assert result.get_response().id == "r-1" and result.get_response().model_version == "1"


def test_typed_contents_in_and_out(served, rows):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.grpc))
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="instances", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    request.outputs.add(name="probabilities")
    reply = stub.ModelInfer(request, timeout=30)
    assert not reply.raw_output_contents and reply.outputs[0].datatype == "FP32"
    typed = np.array(reply.outputs[0].contents.fp32_contents).reshape(list(reply.outputs[0].shape))
    raw = triton.InferenceServerClient(served.grpc).infer("digits", [infer_input(rows)]).as_numpy("probabilities")
    np.testing.assert_allclose(typed, raw, atol=1e-6)


@pytest.mark.parametrize("shape, model, code, message", [
    ([3, 4], "digits", grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape must be [rows, 8, 8, 1]"),
    ([0, 8, 8, 1], "digits", grpc.StatusCode.INVALID_ARGUMENT, "0 rows"),
    ([5000, 8, 8, 1], "digits", grpc.StatusCode.INVALID_ARGUMENT, "at most 4096 are allowed"),
    ([1, 8, 8, 1], "nope", grpc.StatusCode.NOT_FOUND, "nope"),
    ([1, 8, 8, 1], "digits@abc", grpc.StatusCode.NOT_FOUND, "not a version number"),
    ([1, 8, 8, 1], "digits@²", grpc.StatusCode.NOT_FOUND, "not a version number"),
    ([1, 8, 8, 1], "digits@7", grpc.StatusCode.NOT_FOUND, "7"),
])
def test_errors_get_the_status_matching_http(served, shape, model, code, message):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.grpc))
    model, _, version = model.partition("@")
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="instances", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(shape, "<f4").tobytes())
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(request, timeout=30)
    assert failed.value.code() == code and message in failed.value.details()


def test_malformed_contents_and_outputs_are_invalid_argument(served):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.grpc))
    cases = []
    short = service_pb2.ModelInferRequest(model_name="digits")
    short.inputs.add(name="instances", datatype="FP32", shape=[1, 8, 8, 1])
    short.raw_input_contents.append(b"\0" * 10)
    cases.append((short, "raw_input_contents[0] has 10 bytes"))
    typed = service_pb2.ModelInferRequest(model_name="digits")
    typed.inputs.add(name="instances", datatype="FP32", shape=[1, 8, 8, 1]).contents.fp32_contents.extend([1.0])
    cases.append((typed, "holds 1 values"))
    text = service_pb2.ModelInferRequest(model_name="digits")
    text.inputs.add(name="instances", datatype="BYTES", shape=[1, 8, 8, 1])
    cases.append((text, "is not one of"))
    unknown = service_pb2.ModelInferRequest(model_name="digits")
    unknown.inputs.add(name="instances", datatype="FP32", shape=[1, 8, 8, 1])
    unknown.raw_input_contents.append(np.zeros((1, 8, 8, 1), "<f4").tobytes())
    unknown.outputs.add(name="logits")
    cases.append((unknown, "unknown output 'logits'"))
    nan = service_pb2.ModelInferRequest(model_name="digits")
    nan.inputs.add(name="instances", datatype="FP32", shape=[1, 8, 8, 1])
    nan.raw_input_contents.append(np.full((1, 8, 8, 1), np.nan, "<f4").tobytes())
    cases.append((nan, "non-finite"))
    for request, message in cases:
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(request, timeout=30)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
        assert message in failed.value.details()
    assert httpx.get(f"{served.base}/readyz").status_code == 200  # and it keeps serving


def test_the_clients_deadline_is_the_requests_queue_deadline(served, rows):
    """Behind 3,840 queued rows, one-row calls with a 10 ms deadline expire in the queue: the
    client gets DEADLINE_EXCEEDED, and the service goes on answering."""
    import threading

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.grpc))

    def request(x):
        r = service_pb2.ModelInferRequest(model_name="digits")
        r.inputs.add(name="instances", datatype="FP32", shape=list(x.shape))
        r.raw_input_contents.append(x.astype("<f4").tobytes())
        return r

    big = np.repeat(rows, 320, axis=0)[:3840]  # one row less than the queue holds would still fit
    busy = threading.Thread(target=lambda: stub.ModelInfer(request(big), timeout=60))
    busy.start()
    codes = set()
    try:
        while busy.is_alive() and grpc.StatusCode.DEADLINE_EXCEEDED not in codes:
            try:
                stub.ModelInfer(request(rows[:1]), timeout=0.01)
            except grpc.RpcError as exc:
                codes.add(exc.code())
    finally:
        busy.join(60)
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert stub.ModelInfer(request(rows[:1]), timeout=30).outputs[0].name == "probabilities"


def test_a_full_queue_is_resource_exhausted(served):
    """4,000-row calls at once: one whose rows the queue (4,096 rows) cannot take while another
    waits is RESOURCE_EXHAUSTED, the twin of HTTP's 429."""
    from concurrent.futures import ThreadPoolExecutor

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.grpc))
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="instances", datatype="FP32", shape=[4000, 8, 8, 1])
    request.raw_input_contents.append(np.zeros((4000, 8, 8, 1), "<f4").tobytes())

    def outcome(_):
        try:
            stub.ModelInfer(request, timeout=60)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details()

    seen = set()
    with ThreadPoolExecutor(6) as pool:
        for _ in range(20):
            seen.update(pool.map(outcome, range(6)))
            if any("would pass the limit of 4096" in details for _, details in seen):
                break
    assert {code for code, _ in seen} == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, seen
    assert any("would pass the limit of 4096" in details for _, details in seen), seen


def test_health_service_and_reflection(served):
    channel = grpc.insecure_channel(served.grpc)
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", "digits", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == serving
    with pytest.raises(grpc.RpcError) as failed:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert {s.name for s in listed.list_services_response.service} == {
        "inference.GRPCInferenceService", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    # a service's definitions, from the pool of its own that TensorFlow Serving's live in
    described = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="tensorflow.serving.PredictionService")])))
    files = described.file_descriptor_response.file_descriptor_proto
    assert files and b"PredictionService" in b"".join(files)


def test_message_size_concurrent_calls_and_bytes_in_flight_are_bounded(trained_repository):
    """A message past max_body_bytes is refused by gRPC before a handler sees it; past
    max_grpc_calls calls are refused; calls whose messages together pass the bytes in flight
    (shared with HTTP) are refused RESOURCE_EXHAUSTED: each way a 429's twin, and the server
    goes on answering."""
    from concurrent.futures import ThreadPoolExecutor

    env = {"ENSEMBLE_MAX_BODY_BYTES": "300000", "ENSEMBLE_MAX_INFLIGHT_BYTES": "400000",
           "ENSEMBLE_MAX_GRPC_CALLS": "6"}
    server = grpc_server(trained_repository, env=env)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))

        def request(rows):
            r = service_pb2.ModelInferRequest(model_name="digits")
            r.inputs.add(name="instances", datatype="FP32", shape=[rows, 8, 8, 1])
            r.raw_input_contents.append(np.zeros((rows, 8, 8, 1), "<f4").tobytes())
            return r

        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(request(1200), timeout=30)  # 307,200 bytes of rows
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        def outcome(rows):
            try:
                stub.ModelInfer(request(rows), timeout=60)
                return "ok"
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                return exc.details()

        seen = set()
        with ThreadPoolExecutor(24) as pool:
            for _ in range(40):  # 24 calls of 1,000 rows (256 KB) at once, until both limits were hit
                seen.update(pool.map(outcome, [1000] * 24))
                if any("bytes of requests" in s for s in seen) and any("Concurrent RPC limit" in s for s in seen):
                    break
        assert "ok" in seen
        assert any("bytes of requests" in s and "limit of 400000" in s for s in seen), seen
        assert any("Concurrent RPC limit" in s for s in seen), seen
        # and it answers once the calls are over (gRPC counts a call out just after its answer)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert stub.ModelInfer(request(1), timeout=30).outputs[0].name == "probabilities"
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
        metrics = httpx.get(f"{server.base}/metrics").text
        refused = [line for line in metrics.splitlines()
                   if line.startswith('ensemble_rejected_requests_total{reason="bytes_in_flight"}')]
        assert float(refused[0].split()[-1]) >= 1
        assert 'route="/inference.GRPCInferenceService/ModelInfer",status="429"' in metrics
    finally:
        server.kill()


def test_with_nothing_to_serve_health_and_readiness_say_so(tmp_path):
    """An empty repository: not ready (the twin of /readyz's 503), the default's health
    NOT_SERVING, an inference for a name the repository lacks NOT_FOUND."""
    port = free_port()
    (tmp_path / "models").mkdir()
    server = ServerProcess(tmp_path / "models", args=["--grpc-port", str(port)]).start(wait_ready=False)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
        assert not stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        request = service_pb2.ModelInferRequest(model_name="digits")
        request.inputs.add(name="instances", datatype="FP32", shape=[1, 8, 8, 1])
        request.raw_input_contents.append(np.zeros((1, 8, 8, 1), "<f4").tobytes())
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(request, timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert httpx.get(f"{server.base}/readyz").status_code == 503
    finally:
        server.kill()


def test_sigterm_drains_the_grpc_calls_received(trained_repository):
    """Calls sent before SIGTERM are answered; calls after it are answered or refused (UNAVAILABLE,
    or CANCELLED for one that reaches the gRPC server as it stops: seen in a full run), and the
    process exits promptly (the gRPC server stops with HTTP and gives its calls the same grace)."""
    import signal
    import threading

    server = grpc_server(trained_repository)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="instances", datatype="FP32", shape=[1000, 8, 8, 1])
    request.raw_input_contents.append(np.zeros((1000, 8, 8, 1), "<f4").tobytes())
    outcomes, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.ModelInfer(request, timeout=30)
                outcomes.append((started, grpc.StatusCode.OK))
            except grpc.RpcError as exc:
                outcomes.append((started, exc.code()))

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        answering = time.monotonic() + 60
        while sum(status == grpc.StatusCode.OK for _, status in outcomes) < 8:  # the clients are being served
            assert time.monotonic() < answering, outcomes
            time.sleep(0.01)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        exited = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.kill()
    before = [status for started, status in outcomes if started < signalled]
    after = {status for started, status in outcomes if started >= signalled}
    assert code in (0, -signal.SIGTERM) and exited - signalled < 10
    assert before and set(before) == {grpc.StatusCode.OK}, before
    assert after <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, after
