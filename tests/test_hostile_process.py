"""Hostile clients against a real server process: 32 connections at once sending bodies built to
make a parser allocate (numbers, empty rows, deep nesting, rows that parse but are wrong),
while a normal client goes on asking. The server's resident memory stays within its stated
bound (service.dataplane.limits) and the normal client is answered throughout."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from service.config import Settings
from service.dataplane.limits import SMALL_POOL, json_value_limit, largest_body
from contract.manifest import InputSpec
from tests.server import ServerProcess

SETTINGS = Settings()
LIMIT = largest_body(InputSpec(shape=(8, 8, 1)), SETTINGS.max_rows_per_request)
VALUES = json_value_limit(InputSpec(shape=(8, 8, 1)), SETTINGS.max_rows_per_request, SETTINGS.max_json_values)


def hostile_bodies() -> dict[str, bytes]:
    """Bodies just under the body limit, each the worst of its kind for a JSON parser."""
    fill = LIMIT - 64
    return {
        "floats": b'{"instances": [' + b",".join([b"1"] * (fill // 2)) + b"]}",
        "empty rows": b'{"instances": [' + b",".join([b"[]"] * (fill // 3)) + b"]}",
        "deep nesting": b'{"instances": ' + b"[" * (fill // 2) + b"]" * (fill // 2) + b"}",
        # as many values as a valid request may hold: parsed whole, then refused (too many rows)
        "parsed then wrong": b'{"instances": [' + b",".join([b"[1]"] * ((VALUES - 1100) // 3)) + b"]}",
    }


def send(port: int, body: bytes) -> int:
    """POST body to /predict on a fresh connection; the status, or 0 if the server hung up
    while the body was still being sent (it may answer before reading all of it)."""
    head = (f"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(head + body)
        except OSError:
            pass
        try:
            reply = s.recv(64)
        except OSError:
            return 0
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.slow
def test_32_hostile_clients_cannot_grow_memory_past_the_bound_and_normal_requests_go_on(trained_repository):
    bodies = hostile_bodies()
    assert all(len(b) <= LIMIT for b in bodies.values())
    server = ServerProcess(trained_repository).start()
    try:
        one_row = {"instances": [[[[0]] * 8] * 8]}
        with httpx.Client(base_url=server.base, timeout=30) as client:
            for _ in range(20):
                assert client.post("/predict", json=one_row).status_code == 200
        idle = server.rss()
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) here

        stop = time.monotonic() + 12
        statuses: dict[str, list[int]] = {kind: [] for kind in bodies}
        normal: list[tuple[int, float]] = []

        def attack(kind: str) -> None:
            while time.monotonic() < stop:
                statuses[kind].append(send(server.port, bodies[kind]))

        def ask() -> None:
            with httpx.Client(base_url=server.base, timeout=30) as c:
                while time.monotonic() < stop:
                    started = time.monotonic()
                    normal.append((c.post("/predict", json=one_row).status_code, time.monotonic() - started))
                    time.sleep(0.05)

        threads = [threading.Thread(target=attack, args=(kind,)) for kind in bodies for _ in range(8)]
        threads.append(threading.Thread(target=ask))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = peak_rss(server.proc.pid)

        # The bound of service.dataplane.limits: the bodies in flight (both pools, each buffer up to
        # 1/8 over-allocated as it grows), one parse's values (<= 32 bytes each) and up to four
        # working copies of its body, with 64 MiB for the allocator's slack and the batches.
        bound = (SETTINGS.max_inflight_bytes + SMALL_POOL) * 9 // 8 + VALUES * 32 + 4 * LIMIT + 64 * 2**20
        print(f"\n[figures] hostile bodies: idle RSS {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB "
              f"(+{(peak - idle) / 2**20:.0f}, bound +{bound / 2**20:.0f}); "
              + ", ".join(f"{k}: {len(v)} sent, statuses {sorted(set(v))}" for k, v in statuses.items())
              + f"; normal: {len(normal)} answered, slowest {max(t for _, t in normal) * 1000:.0f} ms")
        assert peak - idle < bound, (peak, idle, bound)
        for kind, got in statuses.items():
            assert got, kind
            assert set(got) <= {413, 422, 429, 0}, (kind, sorted(set(got)))  # never a 2xx or a 500
        assert normal and {status for status, _ in normal} == {200}, normal
        assert len(normal) >= 50  # answered throughout the 12 s, not only at the end
        assert "Traceback" not in server.output()
    finally:
        server.kill()


@pytest.mark.slow
def test_16_maximal_requests_on_each_protocol_stay_within_the_documented_bound(trained_repository):
    """On the image's memory settings (Dockerfile), 16 concurrent maximal requests on each of
    HTTP JSON (4,096 rows of full-precision numbers: parsed, then computed or refused 429), HTTP
    binary (4,096 rows of FP32) and gRPC (messages of nearly the receive limit), for 10 s: the
    peak stays under docs/operations.md's bound, service.dataplane.limits.memory_bound."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from service.dataplane.limits import largest_message, memory_bound
    from tests.deploy_checks import image_limits
    from tests.server import grpc_server

    env = image_limits()
    shipped = Settings(**{k.removeprefix("ENSEMBLE_").lower(): int(v) for k, v in env.items()}, grpc_port=8001)
    spec, rows = InputSpec(shape=(8, 8, 1)), shipped.max_rows_per_request
    body_limit = min(largest_body(spec, rows), shipped.max_body_bytes)
    message_limit = min(largest_message(spec, rows), shipped.max_body_bytes)
    values = json_value_limit(spec, rows, shipped.max_json_values)
    bound = memory_bound(shipped, body_limit, message_limit, values)

    x = np.random.default_rng(0).random((rows, 8, 8, 1))
    json_body = b'{"instances": ' + repr(x.tolist()).encode() + b"}"  # full-precision floats
    assert len(json_body) <= body_limit
    raw = x.astype("<f4").tobytes()
    head = orjson.dumps({"inputs": [{"name": "instances", "shape": [rows, 8, 8, 1], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(raw)}}]})
    message = service_pb2.ModelInferRequest(model_name="digits")
    message.inputs.add(name="instances", datatype="FP32", shape=[1, 8, 8, 1])  # refused after it is received
    message.raw_input_contents.append(b"\0" * (message_limit - 4096))

    server = grpc_server(trained_repository, env=env)
    try:
        with httpx.Client(base_url=server.base, timeout=30) as client:
            for _ in range(10):
                assert client.post("/predict", json={"instances": [[[[0]] * 8] * 8]}).status_code == 200
        idle = server.rss()
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")
        stop = time.monotonic() + 10
        statuses: dict[str, set] = {"json": set(), "binary": set(), "grpc": set()}

        def http(kind: str) -> None:
            with httpx.Client(base_url=server.base, timeout=60) as c:
                while time.monotonic() < stop:
                    if kind == "json":
                        r = c.post("/predict", content=json_body, headers={"content-type": "application/json"})
                    else:
                        r = c.post("/v2/models/digits/infer", content=head + raw, headers={
                            "content-type": "application/octet-stream",
                            "inference-header-content-length": str(len(head))})
                    statuses[kind].add(r.status_code)

        def rpc() -> None:
            with grpc.insecure_channel(server.grpc) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                while time.monotonic() < stop:
                    try:
                        stub.ModelInfer(message, timeout=60)
                        statuses["grpc"].add("OK")
                    except grpc.RpcError as exc:
                        statuses["grpc"].add(exc.code().name)

        threads = [threading.Thread(target=http, args=(kind,)) for kind in ("json", "binary") for _ in range(16)]
        threads += [threading.Thread(target=rpc) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = peak_rss(server.proc.pid)
        print(f"\n[figures] 16 maximal requests on each of JSON ({len(json_body) / 2**20:.1f} MiB), binary "
              f"({len(raw) / 2**20:.1f} MiB) and gRPC ({message.ByteSize() / 2**20:.1f} MiB) on the image's "
              f"settings: idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB (+{(peak - idle) / 2**20:.0f}, "
              f"bound +{bound / 2**20:.0f}); statuses {statuses}")
        assert peak - idle < bound, (peak, idle, bound)
        assert 200 in statuses["json"] and 200 in statuses["binary"], statuses
        assert statuses["json"] | statuses["binary"] <= {200, 429}, statuses
        assert statuses["grpc"] <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, statuses
        assert "Traceback" not in server.output()
    finally:
        server.kill()
