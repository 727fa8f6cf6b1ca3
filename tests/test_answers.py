"""Every answer checked against its own numbers, computed from the members' SavedModels directly:
requests of different rows merged into one batch of the real ensemble (through the batcher, and
through a real server in the production configuration: a compile child, TensorFlow Lite, the
fast HTTP lane), and each loaded version answering with its own numbers on every versioned route
(REST, the Open Inference Protocol over HTTP and gRPC, TensorFlow Serving over gRPC).

The second version differs from the first in its numbers, not only its label: two of its members
are dropped and the others weighted unevenly, so an answer from the wrong version cannot pass."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from service.batching import Batcher
from service.config import Settings
from service.engines.loader import EngineLoader, plan_of
from contract.manifest import read_manifest
from contract.scores import served as served_probabilities
from tests.repo_tools import publish_copy
from tests.server import grpc_server
from tests.test_api import COMPILED
from training.members import predict_saved_model

ATOL = 1e-5  # TensorFlow Lite against the members' SavedModels, as in tests/test_api.py
ROWS = 64  # the pool of test rows requests draw from


def direct(version_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(served probabilities, per-member probabilities (rows, members, classes)) of a version,
    from its members' SavedModels called one by one and pooled as the manifest says."""
    manifest = read_manifest(version_dir)
    members = np.stack([predict_saved_model(version_dir / m.path, x) for m in manifest.members], axis=1)
    return served_probabilities(members, manifest.weights, manifest.temperature), members


def requests_of_different_rows(count: int, seed: int, sizes=(1, 2, 3, 5, 8, 13)) -> list[np.ndarray]:
    """`count` index arrays into the row pool, of mixed sizes, no two alike."""
    rng = np.random.default_rng(seed)
    return [rng.choice(ROWS, size=sizes[i % len(sizes)], replace=False) for i in range(count)]


@pytest.fixture(scope="module")
def pool(digits_test_split) -> np.ndarray:
    return digits_test_split.x[:ROWS].astype("float32")


# -- the batcher, with the ensemble the server runs ---------------------------------------------

@pytest.fixture(scope="module")
def ensemble(trained_repository):
    """Version 1 as the server loads it: compiled (or from the test session's compile cache),
    warmed, on TensorFlow Lite."""
    settings = Settings(repository=trained_repository, isolated_loading=False, compile_cache_dir=COMPILED,
                        warmup_batch_sizes=(1,))
    version_dir = trained_repository / "digits" / "1"
    loaded = EngineLoader(settings, plan_of(settings, os.cpu_count() or 1))(
        read_manifest(version_dir), version_dir, lambda: None)
    assert loaded.engine.kind == "tflite"
    return loaded


def test_merged_requests_of_the_real_ensemble_each_get_their_own_rows(ensemble, trained_repository, pool):
    """40 concurrent requests of 1 to 20 rows (two split, being over the batch limit), each of
    other rows, through one batcher: merged into batches, and each answered with the numbers of
    its own rows (all three outputs), as when sent alone and as the members say."""
    requests = requests_of_different_rows(38, seed=1) + [np.arange(20), np.arange(ROWS - 1, 43, -1)]
    merged: list[int] = []

    async def go():
        batcher = Batcher(max_batch_size=16, on_batch=lambda stats: merged.append(stats.requests))
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(ensemble, pool[i]) for i in requests))
        finally:
            await batcher.stop()

    answers = asyncio.run(go())
    assert max(merged) > 1, f"no batch merged two requests: {merged}"
    served, members = direct(trained_repository / "digits" / "1", pool)
    for rows, (average, per_member, scores) in zip(requests, answers):
        alone = ensemble.predict(pool[rows])
        np.testing.assert_allclose(average, served[rows], atol=ATOL)
        np.testing.assert_allclose(per_member, members[rows], atol=ATOL)
        for got, want in zip((average, per_member, scores), alone):
            np.testing.assert_allclose(got, want, atol=ATOL)


# -- a real server in the production configuration ----------------------------------------------

def weighted_subset(raw: dict) -> None:
    """A manifest edit: the first three members only, weighted 0.6, 0.3, 0.1."""
    raw["members"] = [dict(m, weight=w) for m, w in zip(raw["members"][:3], (0.6, 0.3, 0.1))]


@pytest.fixture(scope="module")
def production(trained_repository, tmp_path_factory, pool):
    """`ensemble-serve` as shipped (versions compiled in a child process, TensorFlow Lite, the fast
    HTTP lane) with gRPC, on a copy of the repository where version 2 (weighted_subset) went live
    after version 1; `.expected[v]`: version v's (served, members) of the row pool."""
    server = grpc_server(trained_repository, tmp_path_factory.mktemp("answers") / "models")
    try:
        assert publish_copy(server.repository, edit=weighted_subset) == 2
        server.wait_live(2)
        status = server.client.get("/models").json()
        assert status["http"] == "fast"
        versions = {v["version"]: v for v in status["models"][0]["versions"]}
        assert versions[1]["engine"] == versions[2]["engine"] == "tflite", versions
        server.expected = {v: direct(server.repository / "digits" / str(v), pool) for v in (1, 2)}
        gap = np.abs(server.expected[1][0] - server.expected[2][0]).max()
        assert gap > 0.05, f"versions 1 and 2 answer alike (largest difference {gap}): the test could not tell them apart"
        yield server
    finally:
        server.kill()


def metric(server, name: str) -> float:
    """The sum of a metric's samples named `name` (all labels) in the server's exposition."""
    lines = server.client.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0].split(" ")[0] == name)


def post_rows(client: httpx.Client, route: str, x: np.ndarray) -> np.ndarray:
    """The served probabilities of rows x from one of the HTTP inference routes."""
    if route.startswith("/v2/"):
        body = {"inputs": [{"name": "instances", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}]}
        resp = client.post(route, json=body)
        assert resp.status_code == 200, resp.text
        out = next(o for o in resp.json()["outputs"] if o["name"] == "probabilities")
        return np.asarray(out["data"]).reshape(out["shape"])
    resp = client.post(route, json={"instances": x.tolist()})
    assert resp.status_code == 200, resp.text
    return np.asarray(resp.json()["predictions"])


def model_infer_request(x: np.ndarray, version: str = "", outputs: tuple[str, ...] = ()):
    """An Open Inference Protocol ModelInfer request (tritonclient's messages) for rows x of digits,
    sent raw, asking for `outputs` (none: the server's default)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="digits", model_version=version)
    request.inputs.add(name="instances", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


HTTP_ROUTES = ("/predict", "/v1/models/digits:predict", "/v2/models/digits/infer")


def test_concurrent_requests_of_different_rows_through_the_fast_lane(production, pool):
    """Requests of mixed sizes and rows on the three HTTP inference routes at once, behind a large
    one so that they queue and merge: each answered with its own rows' numbers. Rounds repeat
    (at most 10) until the server reports a batch that merged requests."""
    live = production.expected[2][0]
    big = np.arange(1500) % ROWS  # the small ones queue behind it while it computes
    batches, computed = (metric(production, n) for n in ("ensemble_batch_size_rows_count",
                                                         "ensemble_queue_wait_seconds_count"))
    with httpx.Client(base_url=production.base, timeout=30,
                      limits=httpx.Limits(max_connections=12)) as client, ThreadPoolExecutor(12) as threads:
        for round_ in range(10):
            work = [big] + requests_of_different_rows(36, seed=round_)
            routes = [HTTP_ROUTES[i % len(HTTP_ROUTES)] for i in range(len(work))]
            answers = list(threads.map(lambda rw: post_rows(client, rw[0], pool[rw[1]]), zip(routes, work)))
            for rows, route, answer in zip(work, routes, answers):
                np.testing.assert_allclose(answer, live[rows], atol=ATOL, err_msg=f"{route}, rows {rows[:8]}")
            new_batches = metric(production, "ensemble_batch_size_rows_count") - batches
            new_computed = metric(production, "ensemble_queue_wait_seconds_count") - computed
            if new_computed > new_batches:  # some batch held more than one request
                break
        else:
            pytest.fail(f"in 10 rounds no batch merged two requests ({new_batches} batches, {new_computed} requests)")


@pytest.mark.parametrize("version", [1, 2])
def test_each_versioned_http_route_answers_with_that_versions_numbers(production, pool, version):
    """TensorFlow Serving REST and the Open Inference Protocol over HTTP, with a version in the
    path: that version's numbers; without one: the live version's."""
    x = pool[:9]
    want = production.expected[version][0][:9]
    with httpx.Client(base_url=production.base, timeout=30) as client:
        for route in (f"/v1/models/digits/versions/{version}:predict",
                      f"/v2/models/digits/versions/{version}/infer"):
            np.testing.assert_allclose(post_rows(client, route, x), want, atol=ATOL, err_msg=route)
        resp = client.post(f"/v1/models/digits/versions/{version}:predict", json={"instances": x.tolist()})
        assert resp.json()["model"] == {"name": "digits", "version": version}
        # unversioned: the live version
        np.testing.assert_allclose(post_rows(client, "/v1/models/digits:predict", x),
                                   production.expected[2][0][:9], atol=ATOL)


@pytest.mark.parametrize("version", [1, 2])
def test_grpc_with_a_version_answers_with_that_versions_numbers(production, pool, version):
    """The Open Inference Protocol's model_version and TensorFlow Serving's model_spec.version."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    from tritonclient.grpc import service_pb2_grpc

    from tests.test_grpc_tfs import predict_request

    x = pool[:9]
    served, members = production.expected[version][0][:9], production.expected[version][1][:9]
    with grpc.insecure_channel(production.grpc) as channel:
        request = model_infer_request(x, str(version), outputs=("probabilities", "members"))
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert reply.model_version == str(version)
        got = {o.name: np.frombuffer(raw, "<f4").reshape(o.shape)
               for o, raw in zip(reply.outputs, reply.raw_output_contents)}
        np.testing.assert_allclose(got["probabilities"], served, atol=ATOL)
        np.testing.assert_allclose(got["members"], members, atol=ATOL)

        tfs = predict_request(x, version=version)
        tfs.output_filter.append("predictions")
        answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(tfs, timeout=30)
        assert answer.model_spec.version.value == version
        np.testing.assert_allclose(np.frombuffer(answer.outputs["predictions"].tensor_content, "<f4").reshape(9, 10),
                                   served, atol=ATOL)
