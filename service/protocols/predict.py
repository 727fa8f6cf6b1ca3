"""The row format, the codec of `POST /predict` and of TensorFlow Serving's REST predict: a
request's rows decoded into an array of the model's input, an `Answer` (service.answer) encoded
as the body's JSON object. It knows nothing of HTTP or gRPC (service.edge.rest serves it).

A request body is rows (`instances`, TensorFlow Serving's row format) or the batch as one
tensor (`inputs`, its columnar format); the answer is the averaged probabilities (`predictions`
or `outputs`, as the request was), the top class of each row, the class labels and the version
that answered; the `members` option adds each member's probabilities and their disagreement;
`uncertainty` adds each row's `uncertainty` (entropy, expected_entropy and mutual_information,
contract.scores) and, when the version has an abstention threshold, `abstain`.

A format-2 version (named inputs, heads with tasks) takes rows as objects naming its inputs, or
columns by input name, strings as text or {"b64": ...} (`decode_named`), and answers every head
(`named_answer_body`: one object per row keyed by head, as TensorFlow Serving answers a
signature of several outputs, and what each head's task says of its rows).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from contract.manifest import InputSpec, Signature, TensorSpec
from contract import tasks
from service.answer import Answer
from service.errors import InvalidInput, PayloadTooLarge
from service.protocols.arrays import booleans, numeric, parse_json_object, strings, to_spec

_TRUE = {"1", "true", "yes"}


# -- decode -----------------------------------------------------------------------------------

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
    array = numeric(instances, field, spec.shape)
    if array.shape[1:] != spec.shape:
        got = list(array.shape[1:]) if array.ndim > 1 else "a bare number"
        raise InvalidInput(f"each instance must have shape {list(spec.shape)}, got {got}")
    return to_spec(array, spec, field, row="instance")


def columnar_inputs(inputs: Any, spec: InputSpec, max_rows: int) -> np.ndarray:
    """TF Serving's columnar `inputs`: the batch tensor itself, or {name: tensor} for one input."""
    if isinstance(inputs, dict):
        if len(inputs) != 1:
            raise InvalidInput(f"'inputs' names {len(inputs)} tensors; this model takes exactly one")
        inputs = next(iter(inputs.values()))
    return instances_to_array(inputs, spec, max_rows, field="inputs")


# A body that is only {"instances": [...]} or {"inputs": [...]}: the common request, parsed by
# `numeric_rows` without building nested Python lists.
_ONLY_ROWS = re.compile(rb'\s*\{\s*"(instances|inputs)"\s*:')
_NUMBER_BYTES = b"0123456789.eE+- \t\r\n"  # what a JSON number (and the space around it) is made of


@lru_cache(maxsize=64)
def _row_skeleton(shape: tuple[int, ...]) -> bytes:
    """One instance of `shape` as JSON with its numbers and spaces removed: (2, 3) -> [[,,],[,,]]."""
    skeleton = b""
    for d in reversed(shape):
        skeleton = b"[" + b",".join([skeleton] * d) + b"]"
    return skeleton


def numeric_rows(body: bytes, spec: InputSpec, max_rows: int) -> tuple[str, np.ndarray] | None:
    """(field, rows) of a body that is exactly {"instances": rows} or {"inputs": rows}, rows being
    1 to max_rows instances of spec.shape holding only numbers, for a float input; None for any
    other body, which `parse_json_object` and `instances_to_array` then read (and refuse with
    the precise error).

    numpy's conversion of nested lists spends most of its time discovering their shape. Here
    the shape is checked on the text instead: with the numbers and spaces deleted, the array
    must read exactly as the skeleton of its shape, so nothing is ragged and every leaf is made
    of number characters; with the brackets deleted it is a flat JSON list, which orjson then
    parses (rejecting anything that is not a number). Integers come out as float64 before the
    cast to the input's float dtype, exact up to 2**53."""
    if spec.dtype[0] != "f":
        return None
    head = _ONLY_ROWS.match(body)
    end = body.rfind(b"}")
    if head is None or end < 0 or body[end + 1:].strip():
        return None
    rows_json = body[head.end():end]
    skeleton = rows_json.translate(None, _NUMBER_BYTES)
    row = _row_skeleton(spec.shape)
    rows, extra = divmod(len(skeleton) - 1, len(row) + 1)  # "[" + n rows + (n-1) commas + "]"
    if extra or not 1 <= rows <= max_rows or skeleton != b"[" + b",".join([row] * rows) + b"]":
        return None
    try:
        flat = orjson.loads(b"[" + rows_json.translate(None, b"[]") + b"]")
    except orjson.JSONDecodeError:
        return None
    try:
        array = np.array(flat, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    field = head.group(1).decode()
    return field, to_spec(array.reshape(rows, *spec.shape), spec, field, row="instance")


def decode(body: bytes, spec: InputSpec, max_rows: int, max_values: int) -> tuple[np.ndarray, bool]:
    """(rows, columnar): the request's rows, and whether they came as `inputs` (columnar).
    A body of more than `max_values` JSON values is refused before it is parsed."""
    fast = numeric_rows(body, spec, max_rows)
    if fast is not None:
        field, x = fast
        return x, field == "inputs"
    payload = parse_json_object(body, max_values)
    if "inputs" in payload and "instances" not in payload:
        return columnar_inputs(payload["inputs"], spec, max_rows), True
    return instances_to_array(payload.get("instances"), spec, max_rows), False


# -- encode -----------------------------------------------------------------------------------

def flag(value: str | None) -> bool:
    """An option's value ("1", "true", "yes", any case) as true; anything else, or none, false."""
    return value is not None and value.lower() in _TRUE


def answer_body(answer: Answer, columnar: bool, members: bool = False, uncertainty: bool = False) -> dict[str, Any]:
    """The answer as the row format shows it: the ensemble's probabilities (`outputs` when the
    request was columnar, else `predictions`), the top label of each row, the labels, the
    version; with `members`, each member's probabilities and their disagreement; with
    `uncertainty`, each row's scores and, for a version with an abstention rule, `abstain`."""
    head = answer.head
    body: dict[str, Any] = {
        "outputs" if columnar else "predictions": head.combined,
        "labels": head.top_labels(),
        "classes": head.labels,
        "model": {"name": answer.name, "version": answer.version},
    }
    if members:
        body["members"] = head.members_by_name(answer.member_names)
        body["disagreement"] = head.disagreement()
    if uncertainty:
        body["uncertainty"] = head.scores_by_name()
        abstain = head.abstain()
        if abstain is not None:
            body["abstain"] = abstain
    return body


# -- named inputs and heads (manifest format 2) ----------------------------------------------------

def named_tensor(values: Any, spec: TensorSpec, field: str) -> np.ndarray:
    """One named input's rows as an array of its dtype and shape (a null dimension any length,
    the same for every row of the request), or a 4xx naming the input and why; a null is a
    nullable input's missing value (NaN, or the empty string), and refused in any other."""
    if spec.dtype == "string":
        array = strings(values, field, spec)
    elif spec.dtype == "bool":
        array = booleans(values, field, spec)
    else:
        array = numeric(values, field, spec=spec)
    want = (len(values), *spec.shape)
    if array.ndim != len(want) or any(w is not None and g != w for g, w in zip(array.shape, want)):
        shape = ", ".join("any" if d is None else str(d) for d in spec.shape)
        raise InvalidInput(f"'{field}': each row of input {spec.name!r} must have shape [{shape}], got "
                           f"{list(array.shape[1:]) if array.ndim > 1 else 'a single value'}"
                           + (" (rows of one request must share their length)" if not spec.fixed else ""))
    if any(d is None and g == 0 for g, d in zip(array.shape[1:], spec.shape)):
        raise InvalidInput(f"'{field}': input {spec.name!r} has a dimension of length 0; send at least one value")
    if spec.dtype in ("string", "bool"):
        return array
    return to_spec(array, spec, field, row="row")


def _named_rows(instances: Any, signature: Signature, max_rows: int, field: str) -> dict[str, np.ndarray]:
    """`instances`: one object per row naming every input (or, for a version of one input, the
    row's value itself)."""
    _check_rows(instances, field, max_rows)
    names = [spec.name for spec in signature.inputs]
    if len(names) == 1 and not (isinstance(instances[0], dict) and set(instances[0]) == {names[0]}):
        return {names[0]: named_tensor(instances, signature.inputs[0], field)}
    wanted = set(names)
    for i, row in enumerate(instances):  # one set comparison a row; the message only for a bad one
        if not isinstance(row, dict) or row.keys() != wanted:
            if not isinstance(row, dict):
                raise InvalidInput(f"'{field}'[{i}] must be an object naming the inputs {names}")
            _check_names(row, names, f"'{field}'[{i}]")
    return {spec.name: named_tensor([row[spec.name] for row in instances], spec, f"{field}[*].{spec.name}")
            for spec in signature.inputs}


def _check_rows(values: Any, field: str, max_rows: int) -> None:
    """A 4xx unless `field` is a list of 1 to max_rows rows."""
    if not isinstance(values, list) or not values:
        raise InvalidInput(f"'{field}' must be a non-empty list of rows")
    if len(values) > max_rows:
        raise PayloadTooLarge(f"'{field}' has {len(values)} rows; at most {max_rows} are allowed per request")


def _check_names(given: dict, names: list[str], where: str) -> None:
    missing = [n for n in names if n not in given]
    extra = [str(n)[:64] for n in given if n not in names]
    if missing or extra:
        said = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                           f"unknown {extra[:5]}" if extra else "") if part)
        raise InvalidInput(f"{where} must name exactly the inputs {names}: {said}")


def _named_columns(inputs: Any, signature: Signature, max_rows: int) -> dict[str, np.ndarray]:
    """`inputs`: {input name: its rows} (or, for a version of one input, its rows)."""
    names = [spec.name for spec in signature.inputs]
    if not isinstance(inputs, dict):
        if len(names) != 1:
            raise InvalidInput(f"'inputs' must be an object naming the inputs {names}")
        inputs = {names[0]: inputs}
    _check_names(inputs, names, "'inputs'")
    arrays = {}
    for spec in signature.inputs:
        values = inputs[spec.name]
        _check_rows(values, f"inputs.{spec.name}", max_rows)
        arrays[spec.name] = named_tensor(values, spec, f"inputs.{spec.name}")
    if len({len(a) for a in arrays.values()}) > 1:
        raise InvalidInput(f"the inputs have different numbers of rows: "
                           f"{ {name: len(a) for name, a in arrays.items()} }")
    return arrays


def decode_named(body: bytes, signature: Signature, max_rows: int, max_values: int) -> tuple[dict[str, np.ndarray], bool]:
    """(named inputs, columnar) of a request to a format-2 version: `instances` (rows) or
    `inputs` (columns), strings as text or {"b64": ...}."""
    payload = parse_json_object(body, max_values)
    if "inputs" in payload and "instances" not in payload:
        return _named_columns(payload["inputs"], signature, max_rows), True
    if "instances" not in payload:
        raise InvalidInput("missing field 'instances': send {\"instances\": [{\"input name\": value, ...}, ...]}")
    return _named_rows(payload["instances"], signature, max_rows, "instances"), False


def named_answer_body(answer: Answer, columnar: bool, members: bool = False, uncertainty: bool = False,
                      interval: float | None = None) -> dict[str, Any]:
    """A format-2 answer: `predictions` (rows; one object per row keyed by head when there are
    several, as TensorFlow Serving answers a signature of several outputs) or `outputs`
    (columnar: {head: rows}); and per head under `heads` its task, its labels and what each row
    is called (the top class; the binary label; the multi-label labels at 0.5 or more), with
    `members`, `uncertainty` (its task's scores, and `abstain` under an abstention rule) and,
    for a regression head, `interval` at the level asked."""
    heads = answer.heads
    if columnar:
        shown: Any = {name: h.combined for name, h in heads.items()} if len(heads) > 1 else answer.head.combined
    elif len(heads) > 1:
        values = {name: h.combined.tolist() for name, h in heads.items()}
        shown = [{name: values[name][i] for name in heads} for i in range(answer.rows)]
    else:
        shown = answer.head.combined
    described = {}
    for name, head in heads.items():
        entry: dict[str, Any] = {"task": head.task, "labels": list(head.labels)}
        predicted = tasks.predicted_labels(head.task, head.labels, head.combined)
        if predicted is not None:
            entry["predicted"] = predicted
        if members:
            entry["members"] = head.members_by_name(answer.member_names)
        if uncertainty:
            entry["uncertainty"] = head.scores_by_name()
            if head.abstain() is not None:
                entry["abstain"] = head.abstain()
        if interval is not None and head.task == "regression":
            lower, upper = head.interval(interval)
            entry["interval"] = {"level": interval, "lower": lower, "upper": upper}
        described[name] = entry
    return {"outputs" if columnar else "predictions": shown, "heads": described,
            "model": {"name": answer.name, "version": answer.version}}


def level(value: str | None) -> float | None:
    """The `interval` option: a level strictly between 0 and 1, or None when not asked."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 < number < 1.0:
        raise InvalidInput(f"interval must be a level between 0 and 1 (e.g. 0.9), got {value[:20]!r}")
    return number
