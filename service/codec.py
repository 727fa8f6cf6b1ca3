"""Request bodies to numpy arrays and predictions back to JSON, without per-element Python loops.

JSON is parsed with orjson and turned into an array by numpy in one call; the checks that
follow (shape, dtype kind, finiteness) are vectorised.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import orjson

from service.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from service.repository import InputSpec

_JSON_NUMERIC_KINDS = "iuf"  # ints and floats; bools and strings are type errors


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not body:
        raise MalformedRequest("request body is empty; send a JSON object like {\"instances\": [...]}")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MalformedRequest(
            f"request body must be a JSON object, got a JSON {type(payload).__name__}"
        )
    return payload


def instances_to_array(instances: Any, spec: InputSpec, max_rows: int, field: str = "instances") -> np.ndarray:
    """Rows of a request as an array of shape (rows, *spec.shape) and spec.dtype, or a 4xx."""
    if instances is None:
        raise InvalidInput(f"missing field '{field}': send {{\"{field}\": [instance, ...]}}")
    if not isinstance(instances, list):
        raise InvalidInput(f"'{field}' must be a list of instances, got a JSON {type(instances).__name__}")
    if not instances:
        raise InvalidInput(f"'{field}' is empty: send at least one instance")
    if len(instances) > max_rows:
        raise PayloadTooLarge(
            f"'{field}' has {len(instances)} rows; at most {max_rows} are allowed per request"
        )
    try:
        array = np.asarray(instances)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"'{field}' is ragged or mixes types: every instance must be a nested list of numbers "
            f"of shape {list(spec.shape)}"
        ) from None
    if array.dtype.kind not in _JSON_NUMERIC_KINDS:
        raise InvalidInput(
            f"'{field}' must hold numbers only; found {_describe_kind(array.dtype)} "
            f"(expected {spec.dtype} values of shape {list(spec.shape)})"
        )
    if array.shape[1:] != spec.shape:
        got = list(array.shape[1:]) if array.ndim > 1 else "a bare number"
        raise InvalidInput(f"each instance must have shape {list(spec.shape)}, got {got}")
    if spec.dtype.startswith(("int", "uint")) and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InvalidInput(f"'{field}' must hold whole numbers for input dtype {spec.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(spec.dtype, copy=False)
    first = first_nonfinite_row(out)
    if first is not None:
        raise InvalidInput(
            f"'{field}' holds a non-finite number in instance {first} "
            f"(NaN, infinity, or beyond the range of {spec.dtype})"
        )
    return np.ascontiguousarray(out)


def first_nonfinite_row(x: np.ndarray) -> int | None:
    """Index of the first row holding NaN or infinity, or None if every value is finite."""
    if x.dtype.kind != "f" or np.all(np.isfinite(x)):
        return None
    return int(np.argmax((~np.isfinite(x.reshape(len(x), -1))).any(axis=1)))


def _describe_kind(dtype: np.dtype) -> str:
    return {"b": "true/false", "U": "strings", "S": "strings", "O": "null or mixed values"}.get(
        dtype.kind, f"values of type {dtype}"
    )


def predicted_labels(probabilities: np.ndarray, classes: Sequence[str]) -> list[str]:
    """The most probable class label of every row."""
    return [classes[i] for i in np.argmax(probabilities, axis=1)]


def members_by_name(member_probabilities: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """(rows, members, classes) -> {member name: (rows, classes)}, each contiguous for encoding."""
    by_member = np.ascontiguousarray(member_probabilities.transpose(1, 0, 2))
    return dict(zip(names, by_member))


def disagreement(member_probabilities: np.ndarray, ensemble_probabilities: np.ndarray) -> np.ndarray:
    """Per row: share of members whose argmax differs from the ensemble's. (rows, members, k) -> (rows,)"""
    ensemble_top = np.argmax(ensemble_probabilities, axis=-1)[:, None]
    return np.mean(np.argmax(member_probabilities, axis=-1) != ensemble_top, axis=1)


def encode(payload: dict[str, Any]) -> bytes:
    """JSON bytes; numpy arrays are serialised natively by orjson."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
