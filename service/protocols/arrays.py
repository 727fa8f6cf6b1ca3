"""Request content to numpy arrays and answers to JSON, for every protocol's codec: JSON parsing,
one conversion of nested lists, and the cast to the input's dtype, each refusing bad input with
a clear 4xx; JSON bytes of an answer with its arrays serialised natively.

The numeric checks are vectorised (shape, dtype kind, whole numbers, range, finiteness): no
Python loop runs per number; strings are converted one by one (text to UTF-8, base64 decoded).

A format-2 input may be nullable (contract.manifest.TensorSpec): its missing value, JSON's null,
is NaN in a float input and the empty string in a string input, and a NaN sent as a number is
taken; any other input refuses both, saying it takes no missing values. Numbers are looked at
one by one only when numpy could not read them as numbers (a null among them): a request without
a missing value takes the same vectorised path as before.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import orjson

from service.dataplane.limits import json_values
from service.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from contract.manifest import InputSpec, TensorSpec, first_nonfinite_row

_JSON_NUMERIC_KINDS = "iuf"  # ints and floats; bools and strings are type errors


def encode(payload: dict[str, Any]) -> bytes:
    """JSON bytes; numpy arrays are serialised natively by orjson."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def parse_json_object(body: bytes, max_values: int) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it; a 413
    without parsing when it holds more than `max_values` values (service.dataplane.limits)."""
    if not body:
        raise MalformedRequest("request body is empty; send a JSON object like {\"instances\": [...]}")
    if json_values(body) > max_values:
        raise PayloadTooLarge(f"request body holds more JSON values than the largest valid request "
                              f"({max_values}): send fewer rows (or binary tensors)")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MalformedRequest(
            f"request body must be a JSON object, got a JSON {type(payload).__name__}"
        )
    return payload


def numeric(values: Any, field: str, shape: tuple[int, ...] | None = None,
            spec: TensorSpec | None = None) -> np.ndarray:
    """One numpy conversion of nested JSON lists; ragged or non-numeric content is a 422. With
    the `spec` of a named input, nulls are its missing values (`_with_missing`)."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        hint = f" of shape {list(shape)}" if shape else ""
        raise InvalidInput(f"'{field}' is ragged or mixes types: it must be nested lists of numbers{hint}") from None
    if array.dtype.kind not in _JSON_NUMERIC_KINDS:
        if spec is not None and array.dtype.kind == "O":
            return _with_missing(array, spec, field)
        raise InvalidInput(f"'{field}' must hold numbers only; found {_describe_kind(array.dtype)}")
    return array


def _with_missing(array: np.ndarray, spec: TensorSpec, field: str) -> np.ndarray:
    """A named input's values that numpy kept as objects, numbers and nulls, as float64 with
    NaN for each null when the input is nullable; a 422 for anything else, or for a null in an
    input that takes no missing values."""
    flat = array.reshape(-1).tolist()
    kinds = set(map(type, flat))
    if type(None) not in kinds or not kinds <= {int, float, type(None)}:  # bool is not int here
        raise InvalidInput(f"'{field}' must hold numbers only; found {_describe_kind(array.dtype)}")
    if not spec.nullable:
        raise InvalidInput(takes_no_missing(field, spec, "null"))
    try:
        return np.array(flat, dtype=np.float64).reshape(array.shape)  # numpy reads None as NaN
    except OverflowError:
        raise InvalidInput(f"'{field}' holds an integer beyond the range of float64") from None


def takes_no_missing(field: str, spec: TensorSpec, what: str, where: str = "") -> str:
    """The refusal of a missing value (`what`: null, NaN) sent to an input that is not nullable."""
    return f"'{field}' holds {what} (a missing value){where}; input {spec.name!r} does not take missing values"


def check_range(array: np.ndarray, target: np.dtype, field: str) -> None:
    """422 if a value of `array` (integers, or whole floats) is outside the integer dtype's range."""
    info = np.iinfo(target)
    # As Python numbers, compared exactly (an int with a float too): no cast can round them.
    low, high = array.min().item(), array.max().item()
    if low < info.min or high > info.max:
        value = low if low < info.min else high
        raise InvalidInput(f"'{field}' holds {value} outside the range of input dtype {target.name} "
                           f"[{info.min}, {info.max}]")


def narrowed(array: np.ndarray, target: np.dtype, field: str) -> np.ndarray:
    """A message field's values, read at the field's own (wider) type, as `target`: an integer
    outside the target's range is a 422 (the cast would wrap it)."""
    if target.kind in "iu" and array.size and array.dtype != target:
        check_range(array, target, field)
    return array.astype(target, copy=False)


def _describe_kind(dtype: np.dtype) -> str:
    return {"b": "true/false", "U": "strings", "S": "strings", "O": "null or mixed values"}.get(
        dtype.kind, f"values of type {dtype}"
    )


def to_spec(array: np.ndarray, spec: InputSpec | TensorSpec, field: str, row: str = "row") -> np.ndarray:
    """Cast to the input dtype; NaN (but in a nullable input), infinity, overflow of the dtype, a
    fraction for an integer input, or a number outside an integer input's range is a 422 (a cast
    would wrap it)."""
    target = np.dtype(spec.dtype)
    if target.kind in "iu" and array.size:
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise InvalidInput(f"'{field}' must hold whole numbers for input dtype {spec.dtype}")
        if array.dtype != target:
            check_range(array, target, field)
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(spec.dtype, copy=False)
    first = first_nonfinite_row(out)
    if first is not None:
        _refuse_nonfinite(out, first, spec, field, row)
    return np.ascontiguousarray(out)


def _refuse_nonfinite(out: np.ndarray, first: int, spec: InputSpec | TensorSpec, field: str, row: str) -> None:
    """The 422 of an array holding NaN or infinity (`first`: its first such row), saying why;
    none when every such value is NaN in a nullable input (its missing value, which the members
    take)."""
    if isinstance(spec, TensorSpec):
        if spec.nullable:
            infinite = np.isinf(out.reshape(len(out), -1)).any(axis=1)
            if not infinite.any():
                return
            raise InvalidInput(f"'{field}' holds infinity in {row} {int(np.argmax(infinite))} (or a number beyond "
                               f"the range of {spec.dtype}); input {spec.name!r} takes NaN as its missing value, "
                               "not infinity")
        if np.isnan(out[first]).any():
            raise InvalidInput(takes_no_missing(field, spec, "NaN", f" in {row} {first}"))
    raise InvalidInput(
        f"'{field}' holds a non-finite number in {row} {first} "
        f"(NaN, infinity, or beyond the range of {spec.dtype})")


def strings(values: Any, field: str, spec: TensorSpec | None = None) -> np.ndarray:
    """Nested JSON lists of strings (each text, or {"b64": "..."} for bytes, as TensorFlow
    Serving's REST API sends binary strings) as an object array of bytes; anything else, or
    invalid base64, is a 422 naming the field. With the `spec` of a nullable input, a null is
    its missing value, the empty string."""
    try:
        array = np.array(values, dtype=object)
    except ValueError:  # ragged nesting
        raise InvalidInput(f"'{field}' is ragged: every row must have the same shape") from None
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, value in enumerate(flat.tolist()):
        if isinstance(value, str):
            out[i] = value.encode("utf-8")
        elif isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                out[i] = base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput(f"'{field}' holds invalid base64 in its {i}th value") from None
        elif isinstance(value, list):  # numpy keeps ragged lists whole in an object array
            raise InvalidInput(f"'{field}' is ragged: every row must have the same shape")
        elif value is None and spec is not None:
            if not spec.nullable:
                raise InvalidInput(takes_no_missing(field, spec, "null"))
            out[i] = b""
        else:
            raise InvalidInput(f"'{field}' must hold strings (or {{\"b64\": \"...\"}}); found {type(value).__name__}")
    return out.reshape(array.shape)


def booleans(values: Any, field: str, spec: TensorSpec | None = None) -> np.ndarray:
    """Nested JSON lists of true and false as a bool array; anything else is a 422 (a null, with
    the input's `spec`, one that says it takes no missing values)."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidInput(f"'{field}' is ragged or mixes types: it must be nested lists of true/false") from None
    if array.dtype.kind != "b":
        if spec is not None and array.dtype.kind == "O" and None in array.reshape(-1).tolist():
            raise InvalidInput(takes_no_missing(field, spec, "null"))
        raise InvalidInput(f"'{field}' must hold true or false only; found {_describe_kind(array.dtype)}")
    return array
