"""`ensemble-serve` as a real uvicorn process on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.server import ServerProcess


@pytest.fixture()
def server(repository):
    process = ServerProcess(repository).start(timeout=90)
    yield process.base, process.proc
    if process.proc.poll() is None:
        process.terminate(timeout=30)


@pytest.fixture(params=["fast", "stock"])
def either_path(request, repository):
    """The server on the fast HTTP path (the default) and on uvicorn's own protocol."""
    env = {} if request.param == "fast" else {"ENSEMBLE_HTTP_FAST_PATH": "false"}
    process = ServerProcess(repository, env=env).start(timeout=90)
    yield process.base, request.param
    process.terminate(timeout=30)


def test_served_over_http_with_env_settings(server, digits_test_split):
    base, _ = server
    resp = httpx.post(f"{base}/predict", json={"instances": digits_test_split.x[:5].astype(int).tolist()})
    assert resp.status_code == 200
    body = resp.json()
    assert body["model"] == {"name": "digits", "version": 1}
    assert len(body["labels"]) == 5
    accuracy = sum(int(l) == y for l, y in zip(body["labels"], digits_test_split.y[:5])) / 5
    assert accuracy >= 0.4  # a 3-epoch tiny ensemble; the full run is measured in the README
    metrics = httpx.get(f"{base}/metrics")
    assert "ensemble_requests_total" in metrics.text
    refused = httpx.post(f"{base}/predict", content=b"not json")  # the direct lane's error reply
    assert refused.status_code == 400
    for answer in (resp, metrics, refused, httpx.get(f"{base}/models"), httpx.get(f"{base}/ui")):
        assert answer.headers["x-content-type-options"] == "nosniff", answer.request.url


def test_direct_lane_and_asgi_path_answer_alike_on_one_connection(either_path):
    """On the fast path, plain POSTs on the inference routes take service.edge.fast_http's direct
    lane; chunked bodies and other methods take the ASGI path. Good and bad requests alike,
    interleaved on one keep-alive connection: each gets its status and a JSON error, and each is
    counted. uvicorn's own protocol (the fast path off) answers every one the same."""
    base, path = either_path
    digit = {"instances": [[[[0.0]] * 8] * 8]}
    wrong_shape = {"instances": [[1.0, 2.0]]}

    def chunked(data: bytes):
        yield data[:5]
        yield data[5:]

    with httpx.Client(base_url=base, timeout=10) as client:
        answers = [
            client.post("/predict", json=digit),
            client.post("/predict", json=wrong_shape),
            client.post("/predict", content=b'{"instances": [', headers={"content-type": "application/json"}),
            client.post("/v1/models/nope:predict", json=digit),
            client.post("/v1/models/digits:predict", json={"inputs": [[[[0.0]] * 8] * 8]}),
            client.post("/predict", json=digit, headers={"x-request-timeout-ms": "soon"}),
            client.post("/predict", content=chunked(b'{"instances": []}')),  # empty, chunked: ASGI
            client.post("/predict", content=chunked(httpx.Request("POST", "/", json=digit).read())),  # ASGI
            client.get("/predict"),
            client.post("/predict?members=true", json=digit),
        ]
        metrics = client.get("/metrics").text
        assert client.get("/models").json()["http"] == path
    assert f"ensemble_http_fast_path {1.0 if path == 'fast' else 0.0}" in metrics
    assert [a.status_code for a in answers] == [200, 422, 400, 404, 200, 422, 422, 200, 405, 200]
    for a in answers:
        assert a.headers["content-type"] == "application/json"
        assert ("error" in a.json()) == (a.status_code != 200)
    assert answers[0].json()["model"] == {"name": "digits", "version": 1}
    assert "outputs" in answers[4].json() and "members" in answers[9].json()
    assert answers[0].json()["predictions"] == answers[7].json()["predictions"]
    for route, status, count in [("/predict", "200", 3), ("/predict", "422", 3), ("/predict", "400", 1),
                                 ("/v1/models/{name}:predict", "404", 1), ("/predict", "405", 1)]:
        line = f'ensemble_requests_total{{protocol="http",route="{route}",status="{status}"}} {count}.0'
        assert line in metrics, line


def test_a_server_whose_versions_run_on_tensorflow_lite_never_loads_tensorflow(server):
    base, proc = server
    (version,) = httpx.get(f"{base}/models").json()["models"][0]["versions"]
    assert version["engine"] == "tflite"
    libraries = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "_pywrap_litert_interpreter_wrapper" in libraries  # what computes
    assert "libtensorflow_framework" not in libraries and "_pywrap_tensorflow_internal" not in libraries


def test_sigterm_stops_the_server_promptly(server):
    base, proc = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=1)


def test_invalid_setting_exits_2_naming_the_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--repository", str(tmp_path)],
        env={**os.environ, "ENSEMBLE_PORT": "99999"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "ENSEMBLE_PORT" in result.stderr and "65535" in result.stderr


def test_settings_that_contradict_each_other_exit_2_naming_both(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--repository", str(tmp_path)],
        env={**os.environ, "ENSEMBLE_MAX_BODY_BYTES": "999999999"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("ensemble-serve: error: max_body_bytes (999999999) is above "
                                    "max_inflight_bytes"), result.stderr
    assert "(-- or ENSEMBLE_)" not in result.stderr


@pytest.fixture()
def two_workers(repository, tmp_path):
    """`ensemble-serve --workers 2` with gRPC too, both workers ready: (base URL, port, supervisor
    process); the gRPC port is the process's `grpc_port`."""
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--repository", str(repository), "--port", str(port),
         "--grpc-port", str(grpc_port), "--workers", "2", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.grpc_port = grpc_port
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while time.monotonic() < deadline and ready < 5:  # both workers must have loaded
            try:
                ready = ready + 1 if httpx.get(f"{base}/readyz", timeout=1).status_code == 200 else 0
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert ready >= 5, proc.stdout.read1().decode() if proc.poll() is not None else "not ready"
        yield base, port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_two_workers_serve_and_aggregate_their_metrics(two_workers, digits_test_split, tmp_path):
    base, _, proc = two_workers
    rows = {"instances": digits_test_split.x[:1].tolist()}
    for _ in range(40):  # a new connection each, so both workers get some
        assert httpx.post(f"{base}/predict", json=rows).status_code == 200
    text = httpx.get(f"{base}/metrics").text
    line = next(l for l in text.splitlines()
                if l.startswith('ensemble_requests_total{') and 'route="/predict"' in l and 'status="200"' in l)
    assert float(line.rsplit(" ", 1)[1]) == 40.0
    pids = {p.name for p in (tmp_path / "prom").glob("counter_*.db")}
    assert len(pids) >= 2, pids  # values came from more than one process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # ends like one uvicorn process: by the signal


def established_by_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to `port` each process holds (from /proc)."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                established.add(fields[9])
    counts = {}
    for pid in pids:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        counts[pid] = len(inodes & established)
    return counts


def test_workers_share_connections_opened_all_at_once(two_workers):
    _, port, proc = two_workers
    children = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                if p.read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]  # like a pool, or wrk
    try:
        accepted = time.monotonic() + 10
        while True:  # until the workers have accepted every connection (or 10 s)
            counts = {pid: n for pid, n in established_by_process(port, children).items() if n}
            if sum(counts.values()) == 32 or time.monotonic() > accepted:
                break
            time.sleep(0.05)
        # uvicorn's shared socket gave all 32 to one worker; per-worker sockets spread them
        # (a 32-coin toss: fewer than 4 on one side has odds of about 1e-6).
        assert sum(counts.values()) == 32 and len(counts) == 2 and min(counts.values()) >= 4, counts
    finally:
        for client in clients:
            client.close()


def test_workers_share_the_grpc_port_too(two_workers, digits_test_split):
    """Each worker's gRPC server listens on the port with SO_REUSEPORT (gRPC's default): the
    kernel spreads connections over both, and each answers."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    base, _, proc = two_workers
    children = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                if p.read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
    # A local subchannel pool each: channels of one process otherwise share one connection.
    channels = [grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(32)]
    try:
        request = service_pb2.ModelInferRequest(model_name="digits")
        request.inputs.add(name="instances", datatype="FP32", shape=[1, 8, 8, 1])
        request.raw_input_contents.append(digits_test_split.x[:1].astype("<f4").tobytes())
        for channel in channels:  # each its own connection
            reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            assert reply.outputs[0].name == "probabilities"
        counts = {pid: n for pid, n in established_by_process(proc.grpc_port, children).items() if n}
        assert sum(counts.values()) == 32 and len(counts) == 2 and min(counts.values()) >= 4, counts
    finally:
        for channel in channels:
            channel.close()
    text = httpx.get(f"{base}/metrics").text
    line = next(l for l in text.splitlines() if l.startswith("ensemble_requests_total{")
                and 'route="/inference.GRPCInferenceService/ModelInfer"' in l and 'status="200"' in l)
    assert float(line.rsplit(" ", 1)[1]) == 32.0


def test_workers_refuse_an_address_in_use(tmp_path):
    from service.workers import listening_socket, supervise

    port = free_port()
    a, b = listening_socket("127.0.0.1", port), listening_socket("127.0.0.1", port)  # they share
    a.close(), b.close()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        assert supervise(2, "127.0.0.1", port, {}, 1.0) == 1  # said once, no worker started
    finally:
        taken.close()
