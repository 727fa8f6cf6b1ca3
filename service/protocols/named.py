"""Format-2 versions (named inputs, heads with tasks) in the tensor protocols: what the Open
Inference Protocol and TensorFlow Serving's gRPC both need, written once. The checks of a
named input tensor (its name among the version's, its shape against the input's, its rows
against the others'), the cast of its values to the input's dtype, and the catalogue of output
tensors an answer offers, by name.

The output tensors of a version, for each head `H` (service.answer.Head):

- `H`: the combined value (rows, k), FP32: the classes' calibrated probabilities, the labels'
  probabilities of "yes", or the targets' means;
- `H.members`: each member's value (rows, members, k);
- `H.label`: the top class of each row (classification and binary heads), a string;
- the task's uncertainty scores (contract.manifest.TASK_SCORES) as `H.entropy`, ...: (rows,)
  for a classification head, (rows, k) for the others;
- `H.abstain` (rows,), BOOL, for a head with an abstention rule;
- regression: `H.variance` (rows, k), the mixture's calibrated variance, and `H.lower`,
  `H.upper`, the bounds of each row's central interval at the level asked (0.9 by default).

Pure NumPy on the contract's types: no protocol's wire format, no transport.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from contract import tasks
from contract.manifest import TASK_SCORES, Signature, TensorSpec
from service.answer import Answer, Head
from service.errors import InvalidInput, PayloadTooLarge
from service.protocols.arrays import to_spec

DEFAULT_LEVEL = 0.9  # the interval level of H.lower and H.upper when the request names none


def outputs_of(signature: Signature) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Every output tensor of a format-2 version: name -> (numpy dtype name, or "string"; shape
    with -1 for the rows and MEMBERS for the members; the head's name). A head's own name wins
    over another head's derived one (a head called `a.members` beside a head `a`)."""
    catalogue = {head.name: ("float32", (-1, head.columns), head.name) for head in signature.heads}
    for head in signature.heads:
        k, name, task = head.columns, head.name, head.task
        derived = {"members": ("float32", (-1, MEMBERS, k))}
        if task in ("classification", "binary"):
            derived["label"] = ("string", (-1,))
        for score in TASK_SCORES[task]:
            derived[score] = ("float32", (-1,) if task == "classification" else (-1, k))
        if head.abstention is not None:
            derived["abstain"] = ("bool", (-1,))
        if task == "regression":
            derived.update({part: ("float32", (-1, k)) for part in ("variance", "lower", "upper")})
        for part, (dtype, shape) in derived.items():
            catalogue.setdefault(f"{name}.{part}", (dtype, shape, name))
    return catalogue


MEMBERS = -2  # stands for the number of members in `outputs_of`'s shapes (a signature does not hold it)


def shape_of(shape: tuple[int, ...], members: int) -> tuple[int, ...]:
    """An `outputs_of` shape with the number of members put in."""
    return tuple(members if d == MEMBERS else d for d in shape)


def output(answer: Answer, name: str, head: str, level: float = DEFAULT_LEVEL) -> np.ndarray:
    """The output tensor `name` of an answer's rows, an output of the head called `head` (both
    from `outputs_of`): a contiguous array, of bytes objects for a string output."""
    part = name[len(head) + 1:]
    return np.ascontiguousarray(_part(answer.heads[head], part, level))


def _part(head: Head, part: str, level: float) -> np.ndarray:
    if part == "":
        return head.combined
    if part == "members":
        return head.members
    if part == "label":  # classification and binary heads only (outputs_of)
        return np.array([label.encode() for label in tasks.predicted_labels(head.task, head.labels, head.combined)],
                        dtype=object)
    if part == "abstain":
        return head.abstain()
    if part == "variance":
        return head.variance.astype(np.float32, copy=False)
    if part in ("lower", "upper"):
        lower, upper = head.interval(level)
        return (lower if part == "lower" else upper).astype(np.float32, copy=False)
    return head.score(part).astype(np.float32, copy=False)


def level_of(value: object, where: str) -> float:
    """An interval level given in a request's parameters: a number strictly between 0 and 1."""
    if type(value) not in (int, float) or not 0.0 < value < 1.0:
        raise InvalidInput(f"{where} must be a level between 0 and 1 (e.g. 0.9), got {str(value)[:20]}")
    return float(value)


# -- inputs -----------------------------------------------------------------------------------

def input_spec(signature: Signature, name: object, where: str, seen: Mapping[str, Any]) -> TensorSpec:
    """The input called `name` of the version, checking it is one and was not given before."""
    names = [spec.name for spec in signature.inputs]
    if not isinstance(name, str) or name not in names:
        raise InvalidInput(f"{where} names input {str(name)[:64]!r}; this model's inputs are {names}")
    if name in seen:
        raise InvalidInput(f"{where}: input {name!r} is given twice")
    return signature.inputs[names.index(name)]


def check_shape(shape: list[int], spec: TensorSpec, max_rows: int, where: str) -> int:
    """The number of values of a tensor of `shape` for the input `spec`: its rows first, then
    the input's dimensions (a variable one any positive length); InvalidInput or
    PayloadTooLarge naming the input and why."""
    want = ", ".join("any" if d is None else str(d) for d in spec.shape)
    if (len(shape) != len(spec.shape) + 1 or shape[0] < 0
            or any(d is not None and g != d for g, d in zip(shape[1:], spec.shape))):
        raise InvalidInput(f"{where}: input {spec.name!r} must have shape [rows{', ' if want else ''}{want}], "
                           f"got {shape[:10]}")
    short = [g for g, d in zip(shape[1:], spec.shape) if d is None and g < 1]
    if short:
        raise InvalidInput(f"{where}: input {spec.name!r} has a dimension of length {short[0]}; send at least "
                           "one value")
    check_rows(shape[0], max_rows, where)
    return math.prod(shape)


def check_rows(rows: int, max_rows: int, where: str) -> None:
    """A tensor's rows: at least one, at most the limit of a request."""
    if rows == 0:
        raise InvalidInput(f"{where} has 0 rows: send at least one")
    if rows > max_rows:
        raise PayloadTooLarge(f"{where} has {rows} rows; at most {max_rows} are allowed per request")


def cast(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    """A tensor's values as the input's dtype: strings and booleans as they are (their datatype
    was checked; an empty string is a nullable input's missing value), numbers cast and checked
    as every numeric input is (arrays.to_spec: NaN only in a nullable input)."""
    if spec.dtype in ("string", "bool"):
        return array
    return to_spec(array, spec, where)


def check_complete(given: Mapping[str, np.ndarray], signature: Signature) -> dict[str, np.ndarray]:
    """The request's inputs, after checking every input was given and all have the same rows."""
    missing = [spec.name for spec in signature.inputs if spec.name not in given]
    if missing:
        raise InvalidInput(f"missing inputs {missing}: this model's inputs are "
                           f"{[spec.name for spec in signature.inputs]}")
    rows = {name: len(array) for name, array in given.items()}
    if len(set(rows.values())) > 1:
        raise InvalidInput(f"the inputs have different numbers of rows: {rows}")
    return dict(given)
