"""HTTP for the Open Inference Protocol (KServe V2): the infer routes on its codec
(service.protocols.oip) and the data plane, and its health and metadata routes.

    POST /v2/models/{name}[/versions/{v}]/infer        JSON, or binary tensors after a JSON
                                                        header (Inference-Header-Content-Length)
    GET  /v2, /v2/health/live, /v2/health/ready         server metadata and health
    GET  /v2/models/{name}[/versions/{v}][/ready]       model metadata and readiness
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import Response

from service.edge.replies import Reply, as_response, json_reply
from service.protocols import named, oip
from service.runtime import Runtime

if TYPE_CHECKING:
    from service.dataplane.inference import DataPlane
    from service.edge.asgi import Call


async def v2_infer(call: Call, plane: DataPlane) -> Reply:
    """Infer with the named ensemble (its live or a loaded version), JSON or binary."""
    ensemble = plane.ensemble(call.params["name"], call.params.get("version"))
    header = call.headers.get("inference-header-content-length")
    max_rows, max_values = plane.settings.max_rows_per_request, plane.json_value_limit(ensemble)
    deadline = call.deadline(plane.settings.request_timeout_ms)
    if ensemble.manifest.format_version == 1:
        payload, x, wanted, binary_outputs = oip.decode(call.body, header, ensemble.input_spec, max_rows, max_values)
        request_id = payload.get("id")
        answer = await plane.infer(ensemble, x, deadline)
        tensors = {n: oip.output(n, answer) for n in wanted}
    else:
        request_id, x, heads, binary_outputs, level = oip.decode_named(call.body, header, ensemble.signature,
                                                                       max_rows, max_values)
        answer = await plane.infer(ensemble, x, deadline, call.hold)
        tensors = {n: named.output(answer, n, head, level) for n, head in heads}
    content, header_length = oip.encode_outputs(answer.name, answer.version, request_id, tensors, binary_outputs)
    if header_length is None:
        return Reply(200, content)
    return Reply(200, content, b"application/octet-stream",
                 [(b"inference-header-content-length", str(header_length).encode())])


def register(app: FastAPI, runtime: Runtime) -> None:
    """Add the health and metadata routes to the app (the Edge answers /infer)."""
    manager = runtime.manager

    async def v2_server_metadata() -> Response:
        return as_response(json_reply({"name": "ensemble-serving", "version": "0.1.0",
                                       "extensions": ["binary_tensor_data"]}))

    async def v2_live() -> Response:
        return as_response(json_reply({"live": True}))

    async def v2_ready() -> Response:
        ready, _ = manager.readiness()
        return as_response(json_reply({"ready": ready}, 200 if ready else 503))

    async def v2_model(name: str, version: int | None = None) -> Response:
        return as_response(json_reply(oip.model_metadata(manager.get(name, version))))

    async def v2_model_ready(name: str, version: int | None = None) -> Response:
        manager.get(name, version)
        return as_response(json_reply({"name": name, "ready": True}))

    app.add_api_route("/v2", v2_server_metadata, methods=["GET"])
    app.add_api_route("/v2/health/live", v2_live, methods=["GET"])
    app.add_api_route("/v2/health/ready", v2_ready, methods=["GET"])
    app.add_api_route("/v2/models/{name}", v2_model, methods=["GET"])
    app.add_api_route("/v2/models/{name}/versions/{version}", v2_model, methods=["GET"])
    app.add_api_route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"])
    app.add_api_route("/v2/models/{name}/versions/{version}/ready", v2_model_ready, methods=["GET"])


# -- schema -----------------------------------------------------------------------------------

_BODY = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "inputs": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": ["FP32", "FP64", "INT32", "INT64", "UINT8"]},
            "data": {"type": "array", "items": {}},
            "parameters": {"type": "object"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "enum": list(oip.OUTPUTS)},
        "parameters": {"type": "object"}}}}}}
_SUMMARY = "Open Inference Protocol infer (JSON, or binary tensors with Inference-Header-Content-Length)"

# (path template, handler, summary, request body schema); service.edge.asgi matches and
# documents them.
ROUTES = (
    ("/v2/models/{name}/infer", v2_infer, _SUMMARY, _BODY),
    ("/v2/models/{name}/versions/{version}/infer", v2_infer, _SUMMARY, _BODY),
)
