"""HTTP for the row format: `POST /predict` and TensorFlow Serving's REST predict, on the row
codec (service.protocols.predict) and the data plane.

    POST /predict                                       {"instances": [row, ...]} (the default ensemble)
    POST /v1/models/{name}[/versions/{v}]:predict      TensorFlow Serving: `instances` or `inputs`

`?members=true` and `?uncertainty=true` are the codec's options of the same names; `?interval=0.9`
(any level) adds each regression head's interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.edge.replies import Reply, encode
from service.protocols import predict as rows

if TYPE_CHECKING:
    from service.dataplane.inference import DataPlane
    from service.edge.asgi import Call


async def predict(call: Call, plane: DataPlane) -> Reply:
    """/predict: the default ensemble."""
    return await _rows(call, plane, plane.ensemble(None, None))


async def tfs_predict(call: Call, plane: DataPlane) -> Reply:
    """TensorFlow Serving's predict: the named ensemble, its live or a loaded version."""
    return await _rows(call, plane, plane.ensemble(call.params["name"], call.params.get("version")))


async def _rows(call: Call, plane: DataPlane, ensemble) -> Reply:
    members, uncertainty = rows.flag(call.query.get("members")), rows.flag(call.query.get("uncertainty"))
    max_rows, max_values = plane.settings.max_rows_per_request, plane.json_value_limit(ensemble)
    if ensemble.manifest.format_version == 1:
        x, columnar = rows.decode(call.body, ensemble.input_spec, max_rows, max_values)
        answer = await plane.infer(ensemble, x, call.deadline(plane.settings.request_timeout_ms))
        return Reply(200, encode(rows.answer_body(answer, columnar, members, uncertainty)))
    level = rows.level(call.query.get("interval"))
    x, columnar = rows.decode_named(call.body, ensemble.signature, max_rows, max_values)
    answer = await plane.infer(ensemble, x, call.deadline(plane.settings.request_timeout_ms), call.hold)
    return Reply(200, encode(rows.named_answer_body(answer, columnar, members, uncertainty, level)))


# -- schema -----------------------------------------------------------------------------------

_ROWS = {"type": "array", "minItems": 1, "description": "one instance per row, each of the "
         "manifest's input shape (nested lists of numbers)", "items": {}}
_TFS_BODY = {"type": "object", "properties": {"instances": _ROWS, "inputs": _ROWS},
             "description": "row format ('instances') or columnar format ('inputs')"}
_PREDICT_BODY = {"type": "object", "required": ["instances"], "properties": {"instances": _ROWS}}

# (path template, handler, summary, request body schema) of each route; service.edge.asgi
# matches and documents them.
ROUTES = (
    ("/predict", predict, "Predict with the default ensemble (?members=true adds each member's answer, "
     "?uncertainty=true each row's uncertainty and whether to abstain)",
     _PREDICT_BODY),
    ("/v1/models/{name}:predict", tfs_predict, "TensorFlow Serving REST predict (row or columnar format)",
     _TFS_BODY),
    ("/v1/models/{name}/versions/{version}:predict", tfs_predict,
     "TensorFlow Serving REST predict (row or columnar format)", _TFS_BODY),
)
