"""Format-2 versions (named inputs, heads with tasks) in the tensor protocols, in process:
service.protocols.named (the output catalogue, each output tensor, the checks of a named input),
the Open Inference Protocol's JSON and binary body and its gRPC messages (service.protocols.oip),
TensorFlow Serving's Predict (service.protocols.tfs), and what decoded strings add to the bytes
in flight (service.dataplane.limits.decoded_bytes, DataPlane.infer). No server, no TensorFlow:
signatures, heads and answers are built by hand (service.answer.combined_head), and every test
asserts exact values, dtypes, shapes and whole refusal messages, so that a one-line change to a
codec fails one of them (they are written for the mutation run; tests/test_named.py and
tests/test_shapes.py serve real members end to end).

The Open Inference Protocol's messages: the service's own (service/protocols/gen/
grpc_predict_v2_pb2.py, what its gRPC server parses requests with), but built in a descriptor
pool of this file's own from that module's serialized descriptor, without importing it. Importing
it would register the `inference.*` messages in protobuf's default pool, where tritonclient's copy
(imported by tests/test_protocol_messages.py at collection, and by other tests inside their
bodies) would then clash with "duplicate symbol". tritonclient's classes are not used either:
their InferParameter has fields the service's does not (double_param), which would hide what the
server really reads (see the last section).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import math
import re
import struct
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from contract import tasks
from contract.manifest import HeadSpec, Signature, TensorSpec
from service.answer import Answer, Head, combined_head
from service.dataplane.inference import DataPlane
from service.dataplane.limits import STRING_OVERHEAD, Hold, InflightBytes, decoded_bytes
from service.errors import (
    BytesInFlight,
    InvalidInput,
    MalformedRequest,
    PayloadTooLarge,
)
from service.protocols import gen, named, oip, tfs
from service.protocols import tfs_messages as m

# -- doubles ------------------------------------------------------------------------------------

INPUTS = (TensorSpec(name="image", dtype="float32", shape=(2,)), TensorSpec(name="note", dtype="string"),
          TensorSpec(name="flags", dtype="bool", shape=(3,)), TensorSpec(name="tokens", dtype="int32", shape=(None,)))
INPUT_NAMES = "['image', 'note', 'flags', 'tokens']"
KIND = HeadSpec(name="kind", task="classification", labels=("a", "b", "c"))
SPAM = HeadSpec(name="spam", task="binary", labels=("ham", "spam"),
                abstention={"score": "mutual_information", "threshold": 0.01})
TAGS = HeadSpec(name="tags", task="multilabel", labels=("x", "y"))
PRICE = HeadSpec(name="price", task="regression", labels=("p", "q"), variance=True)
SIGNATURE = Signature(inputs=INPUTS, heads=(KIND, SPAM, TAGS, PRICE))
MAX_ROWS = 4
WEIGHTS = (0.5, 0.5)

# Two rows, two members per head; float32 as the engines give them.
KIND_MEMBERS = np.array([[[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], [[0.1, 0.3, 0.6], [0.2, 0.2, 0.6]]], np.float32)
SPAM_MEMBERS = np.array([[[0.9], [0.9]], [[0.2], [0.9]]], np.float32)  # agree on row 0, not row 1
TAGS_MEMBERS = np.array([[[0.9, 0.2], [0.7, 0.4]], [[0.1, 0.6], [0.3, 0.8]]], np.float32)
PRICE_MEANS = np.array([[[1.0, 10.0], [3.0, 10.0]], [[2.0, 4.0], [2.0, 8.0]]], np.float32)
PRICE_VARIANCES = np.array([[[0.5, 1.0], [1.5, 1.0]], [[1.0, 0.0], [1.0, 0.0]]], np.float32)
# The mixture of PRICE: means (2, 10), (2, 6); variances (epistemic + aleatoric) 1 + 1, 0 + 1 and
# 0 + 1, 4 + 0.
PRICE_MEAN = [[2.0, 10.0], [2.0, 6.0]]
PRICE_VARIANCE = [[2.0, 1.0], [1.0, 4.0]]


def answer() -> Answer:
    heads = {"kind": combined_head(KIND, KIND_MEMBERS, None, WEIGHTS),
             "spam": combined_head(SPAM, SPAM_MEMBERS, None, WEIGHTS),
             "tags": combined_head(TAGS, TAGS_MEMBERS, None, WEIGHTS),
             "price": combined_head(PRICE, PRICE_MEANS, PRICE_VARIANCES, WEIGHTS)}
    return Answer("shop", 7, ("m0", "m1"), heads, 2)


def named_ensemble(signature: Signature = SIGNATURE):
    """A format-2 ensemble as the codecs read it."""
    return SimpleNamespace(name="shop", version=7, manifest=SimpleNamespace(format_version=2),
                           signature=signature, member_names=("m0", "m1"))


def refused(exc: type[Exception], message: str):
    """pytest.raises for exactly `message` (the whole of it)."""
    return pytest.raises(exc, match=rf"^{re.escape(message)}$")


def z(level: float) -> float:
    return tasks.z_of(level)


# == service.protocols.named: the catalogue =======================================================

CATALOGUE = {
    "kind": ("float32", (-1, 3), "kind"), "spam": ("float32", (-1, 1), "spam"),
    "tags": ("float32", (-1, 2), "tags"), "price": ("float32", (-1, 2), "price"),
    "kind.members": ("float32", (-1, named.MEMBERS, 3), "kind"), "kind.label": ("string", (-1,), "kind"),
    "kind.entropy": ("float32", (-1,), "kind"), "kind.expected_entropy": ("float32", (-1,), "kind"),
    "kind.mutual_information": ("float32", (-1,), "kind"),
    "spam.members": ("float32", (-1, named.MEMBERS, 1), "spam"), "spam.label": ("string", (-1,), "spam"),
    "spam.entropy": ("float32", (-1, 1), "spam"), "spam.expected_entropy": ("float32", (-1, 1), "spam"),
    "spam.mutual_information": ("float32", (-1, 1), "spam"), "spam.abstain": ("bool", (-1,), "spam"),
    "tags.members": ("float32", (-1, named.MEMBERS, 2), "tags"),
    "tags.entropy": ("float32", (-1, 2), "tags"), "tags.expected_entropy": ("float32", (-1, 2), "tags"),
    "tags.mutual_information": ("float32", (-1, 2), "tags"),
    "price.members": ("float32", (-1, named.MEMBERS, 2), "price"),
    "price.std": ("float32", (-1, 2), "price"), "price.epistemic_std": ("float32", (-1, 2), "price"),
    "price.aleatoric_std": ("float32", (-1, 2), "price"), "price.variance": ("float32", (-1, 2), "price"),
    "price.lower": ("float32", (-1, 2), "price"), "price.upper": ("float32", (-1, 2), "price"),
}


def test_the_catalogue_of_every_task_in_order():
    catalogue = named.outputs_of(SIGNATURE)
    assert catalogue == CATALOGUE
    assert list(catalogue) == list(CATALOGUE)  # the heads' values first, then each head's parts in order
    assert named.MEMBERS == -2


@pytest.mark.parametrize("head, parts", [
    (HeadSpec(name="h", task="classification", labels=("a", "b"), abstention={"score": "entropy", "threshold": 1}),
     [("h", "float32", (-1, 2)), ("h.members", "float32", (-1, -2, 2)), ("h.label", "string", (-1,)),
      ("h.entropy", "float32", (-1,)), ("h.expected_entropy", "float32", (-1,)),
      ("h.mutual_information", "float32", (-1,)), ("h.abstain", "bool", (-1,))]),
    (HeadSpec(name="h", task="binary", labels=("no", "yes")),
     [("h", "float32", (-1, 1)), ("h.members", "float32", (-1, -2, 1)), ("h.label", "string", (-1,)),
      ("h.entropy", "float32", (-1, 1)), ("h.expected_entropy", "float32", (-1, 1)),
      ("h.mutual_information", "float32", (-1, 1))]),
    (HeadSpec(name="h", task="multilabel", labels=("x", "y", "z"),
              abstention={"score": "expected_entropy", "threshold": 1}),
     [("h", "float32", (-1, 3)), ("h.members", "float32", (-1, -2, 3)), ("h.entropy", "float32", (-1, 3)),
      ("h.expected_entropy", "float32", (-1, 3)), ("h.mutual_information", "float32", (-1, 3)),
      ("h.abstain", "bool", (-1,))]),
    (HeadSpec(name="h", task="regression", labels=("t",)),
     [("h", "float32", (-1, 1)), ("h.members", "float32", (-1, -2, 1)), ("h.std", "float32", (-1, 1)),
      ("h.epistemic_std", "float32", (-1, 1)), ("h.aleatoric_std", "float32", (-1, 1)),
      ("h.variance", "float32", (-1, 1)), ("h.lower", "float32", (-1, 1)), ("h.upper", "float32", (-1, 1))]),
    (HeadSpec(name="h", task="regression", labels=("t", "u"), variance=True,
              abstention={"score": "interval_width", "threshold": 2.0, "level": 0.8}),
     [("h", "float32", (-1, 2)), ("h.members", "float32", (-1, -2, 2)), ("h.std", "float32", (-1, 2)),
      ("h.epistemic_std", "float32", (-1, 2)), ("h.aleatoric_std", "float32", (-1, 2)),
      ("h.abstain", "bool", (-1,)), ("h.variance", "float32", (-1, 2)), ("h.lower", "float32", (-1, 2)),
      ("h.upper", "float32", (-1, 2))]),
], ids=["classification-abstaining", "binary", "multilabel-abstaining", "regression", "regression-abstaining"])
def test_the_catalogue_of_one_head_of_each_task(head, parts):
    catalogue = named.outputs_of(Signature(inputs=INPUTS[:1], heads=(head,)))
    assert list(catalogue.items()) == [(name, (dtype, shape, "h")) for name, dtype, shape in parts]


def test_a_heads_own_name_wins_over_another_heads_derived_one():
    a = HeadSpec(name="a", task="classification", labels=("x", "y"))
    a_members = HeadSpec(name="a.members", task="regression", labels=("t",))
    a_label = HeadSpec(name="a.label", task="binary", labels=("n", "y"))
    signature = Signature(inputs=INPUTS[:1], heads=(a, a_members, a_label))
    catalogue = named.outputs_of(signature)
    assert catalogue["a.members"] == ("float32", (-1, 1), "a.members")  # the head, not a's members
    assert catalogue["a.label"] == ("float32", (-1, 1), "a.label")
    assert catalogue["a.members.members"] == ("float32", (-1, -2, 1), "a.members")
    assert catalogue["a.label.label"] == ("string", (-1,), "a.label")
    assert list(catalogue)[:8] == ["a", "a.members", "a.label", "a.entropy", "a.expected_entropy",
                                   "a.mutual_information", "a.members.members", "a.members.std"]
    assert len(catalogue) == 3 + 3 + 7 + 5  # a lost its members and label to the heads of those names
    # in either order of the heads
    flipped = named.outputs_of(Signature(inputs=INPUTS[:1], heads=(a_members, a)))
    assert flipped["a.members"] == ("float32", (-1, 1), "a.members")
    assert flipped["a.label"] == ("string", (-1,), "a")


def test_shape_of_puts_the_members_in():
    assert named.shape_of((-1, named.MEMBERS, 3), 5) == (-1, 5, 3)
    assert named.shape_of((-1, 2), 5) == (-1, 2)
    assert named.shape_of((-1,), 1) == (-1,)
    assert named.shape_of((named.MEMBERS, named.MEMBERS), 4) == (4, 4)
    assert named.shape_of((), 3) == ()


# == service.protocols.named: each output ========================================================

def test_each_output_of_a_classification_head():
    a, head = answer(), answer().heads["kind"]
    combined = named.output(a, "kind", "kind")
    assert combined.dtype == np.float32 and combined.shape == (2, 3) and combined.flags.c_contiguous
    np.testing.assert_allclose(combined, [[0.6, 0.25, 0.15], [0.15, 0.25, 0.6]], rtol=1e-6)
    members = named.output(a, "kind.members", "kind")
    assert members.dtype == np.float32 and members.shape == (2, 2, 3)
    np.testing.assert_array_equal(members, KIND_MEMBERS)
    label = named.output(a, "kind.label", "kind")
    assert label.dtype == object and label.tolist() == [b"a", b"c"]
    for score in ("entropy", "expected_entropy", "mutual_information"):
        value = named.output(a, f"kind.{score}", "kind")
        assert value.dtype == np.float32 and value.shape == (2,)
        np.testing.assert_array_equal(value, head.scores[score].astype(np.float32))
    np.testing.assert_allclose(named.output(a, "kind.entropy", "kind"),
                               [-sum(p * math.log(p) for p in row) for row in ([0.6, 0.25, 0.15], [0.15, 0.25, 0.6])],
                               rtol=1e-5)


def test_each_output_of_a_binary_head_with_its_abstention():
    a = answer()
    np.testing.assert_allclose(named.output(a, "spam", "spam"), [[0.9], [0.55]], rtol=1e-6)
    assert named.output(a, "spam.label", "spam").tolist() == [b"spam", b"spam"]
    abstain = named.output(a, "spam.abstain", "spam")
    assert abstain.dtype == bool and abstain.tolist() == [False, True]  # the members disagree on row 1
    mutual = named.output(a, "spam.mutual_information", "spam")
    assert mutual.dtype == np.float32 and mutual.shape == (2, 1)
    assert mutual[0, 0] == 0.0 and mutual[1, 0] > 0.01
    members = named.output(a, "spam.members", "spam")
    assert members.shape == (2, 2, 1) and members.dtype == np.float32


def test_a_binary_label_is_the_positive_one_from_probability_one_half():
    half, below = np.float32(0.5), np.nextafter(np.float32(0.5), np.float32(0))
    spec = HeadSpec(name="spam", task="binary", labels=("ham", "spam"))
    members = np.array([[[half], [half]], [[below], [below]], [[0.0], [0.2]], [[1.0], [1.0]]], np.float32)
    a = Answer("shop", 7, ("m0", "m1"), {"spam": combined_head(spec, members, None, WEIGHTS)}, 2)
    assert named.output(a, "spam", "spam")[:, 0].tolist() == [0.5, float(below), np.float32(0.1).item(), 1.0]
    assert named.output(a, "spam.label", "spam").tolist() == [b"spam", b"ham", b"ham", b"spam"]


def test_each_output_of_a_multilabel_head():
    a = answer()
    np.testing.assert_allclose(named.output(a, "tags", "tags"), [[0.8, 0.3], [0.2, 0.7]], rtol=1e-6)
    entropy = named.output(a, "tags.entropy", "tags")
    assert entropy.dtype == np.float32 and entropy.shape == (2, 2)
    np.testing.assert_allclose(entropy, tasks.binary_entropy(np.array([[0.8, 0.3], [0.2, 0.7]])), rtol=1e-5)


def test_each_output_of_a_regression_head():
    a = answer()
    mean = named.output(a, "price", "price")
    assert mean.dtype == np.float32 and mean.tolist() == PRICE_MEAN
    variance = named.output(a, "price.variance", "price")
    assert variance.dtype == np.float32 and variance.tolist() == PRICE_VARIANCE
    assert named.output(a, "price.std", "price").tolist() == np.sqrt(np.float32(PRICE_VARIANCE)).tolist()
    assert named.output(a, "price.epistemic_std", "price").tolist() == [[1.0, 0.0], [0.0, 2.0]]
    assert named.output(a, "price.aleatoric_std", "price").tolist() == [[1.0, 1.0], [1.0, 0.0]]
    for part in ("std", "epistemic_std", "aleatoric_std"):
        assert named.output(a, f"price.{part}", "price").dtype == np.float32
    assert named.output(a, "price.members", "price").tolist() == PRICE_MEANS.tolist()


@pytest.mark.parametrize("level", [named.DEFAULT_LEVEL, 0.5, 0.99])
def test_a_regression_heads_bounds_at_a_level(level):
    a = answer()
    combined = tasks.Combined(np.float32(PRICE_MEAN), np.array(PRICE_VARIANCE), {})
    lower, upper = tasks.interval(combined, level)
    got_lower, got_upper = named.output(a, "price.lower", "price", level), named.output(a, "price.upper", "price", level)
    assert got_lower.dtype == got_upper.dtype == np.float32 and got_lower.shape == got_upper.shape == (2, 2)
    assert got_lower.tolist() == lower.astype(np.float32).tolist()
    assert got_upper.tolist() == upper.astype(np.float32).tolist()
    half = z(level) * math.sqrt(2.0)
    assert got_lower[0, 0] == np.float32(2.0 - half) and got_upper[0, 0] == np.float32(2.0 + half)
    assert got_lower[0, 1] == np.float32(10.0 - z(level)) and got_upper[1, 1] == np.float32(6.0 + 2 * z(level))


def test_the_default_level_is_0_9():
    a = answer()
    assert named.DEFAULT_LEVEL == 0.9
    assert named.output(a, "price.upper", "price").tolist() == named.output(a, "price.upper", "price", 0.9).tolist()
    assert named.output(a, "price.upper", "price")[0, 0] == np.float32(2.0 + z(0.9) * math.sqrt(2.0))


def test_an_output_of_a_head_whose_name_holds_dots():
    a_spec = HeadSpec(name="a", task="classification", labels=("x", "y"))
    ab_spec = HeadSpec(name="a.b", task="binary", labels=("no", "yes"))
    am_spec = HeadSpec(name="a.members", task="regression", labels=("t",))
    members = np.array([[[0.9, 0.1], [0.7, 0.3]]], np.float32)
    heads = {"a": combined_head(a_spec, members, None, WEIGHTS),
             "a.b": combined_head(ab_spec, np.array([[[0.2], [0.4]]], np.float32), None, WEIGHTS),
             "a.members": combined_head(am_spec, np.array([[[4.0], [6.0]]], np.float32), None, WEIGHTS)}
    a = Answer("shop", 7, ("m0", "m1"), heads, 2)
    assert named.output(a, "a.b", "a.b").tolist() == [[np.float32(0.3).item()]]
    assert named.output(a, "a.b.label", "a.b").tolist() == [b"no"]
    assert named.output(a, "a.b.members", "a.b").shape == (1, 2, 1)
    assert named.output(a, "a.label", "a").tolist() == [b"x"]
    assert named.output(a, "a.members", "a.members").tolist() == [[5.0]]  # the head called a.members
    assert named.output(a, "a.members.members", "a.members").tolist() == [[[4.0], [6.0]]]
    assert named.output(a, "a.members.variance", "a.members").tolist() == [[1.0]]


def test_an_output_of_a_head_built_by_hand_is_contiguous():
    combined = np.asfortranarray(np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]], np.float32))
    head = Head("h", "classification", ("no", "yes"), combined, np.zeros((3, 1, 2), np.float32),
                {"entropy": np.array([1.0, 2.0, 3.0])}, np.array([0.0, 1.0, 0.5]))
    a = Answer("shop", 7, ("m0",), {"h": head}, 2)
    out = named.output(a, "h", "h")
    assert out.flags.c_contiguous and out.tolist() == combined.tolist()
    assert named.output(a, "h.label", "h").tolist() == [b"yes", b"no", b"no"]  # a tie: the first
    assert named.output(a, "h.abstain", "h").tolist() == [False, True, True]
    entropy = named.output(a, "h.entropy", "h")
    assert entropy.dtype == np.float32 and entropy.tolist() == [1.0, 2.0, 3.0]


# == service.protocols.named: the checks of an input =============================================

@pytest.mark.parametrize("value, level", [(0.5, 0.5), (0.9, 0.9), (1e-9, 1e-9), (0.999999, 0.999999)])
def test_level_of_a_number_between_0_and_1(value, level):
    got = named.level_of(value, "where")
    assert got == level and type(got) is float


@pytest.mark.parametrize("value, shown", [
    (0.0, "0.0"), (1.0, "1.0"), (1, "1"), (0, "0"), (-0.5, "-0.5"), (1.5, "1.5"), (True, "True"), (False, "False"),
    ("0.9", "0.9"), (None, "None"), (float("nan"), "nan"), ([0.5], "[0.5]"), (np.float64(0.5), "0.5"),
    (1.2345678901234568e+300, "1.2345678901234568e+"),
])
def test_level_of_anything_else_is_refused(value, shown):
    with refused(InvalidInput, f"parameters.interval must be a level between 0 and 1 (e.g. 0.9), got {shown}"):
        named.level_of(value, "parameters.interval")


def test_input_spec_by_name():
    assert named.input_spec(SIGNATURE, "flags", "inputs[0]", {}) is INPUTS[2]
    assert named.input_spec(SIGNATURE, "image", "inputs[3]", {"flags": 1}) is INPUTS[0]
    with refused(InvalidInput, f"inputs[1] names input 'Image'; this model's inputs are {INPUT_NAMES}"):
        named.input_spec(SIGNATURE, "Image", "inputs[1]", {})
    with refused(InvalidInput, f"inputs[1] names input 'None'; this model's inputs are {INPUT_NAMES}"):
        named.input_spec(SIGNATURE, None, "inputs[1]", {})
    with refused(InvalidInput, f"inputs[1] names input '3'; this model's inputs are {INPUT_NAMES}"):
        named.input_spec(SIGNATURE, 3, "inputs[1]", {})
    with refused(InvalidInput, f"w names input {'n' * 64!r}; this model's inputs are {INPUT_NAMES}"):
        named.input_spec(SIGNATURE, "n" * 80, "w", {})
    with refused(InvalidInput, "inputs[2]: input 'note' is given twice"):
        named.input_spec(SIGNATURE, "note", "inputs[2]", {"image": 1, "note": 2})


@pytest.mark.parametrize("spec, shape, count", [
    (INPUTS[0], [1, 2], 2), (INPUTS[0], [4, 2], 8), (INPUTS[1], [3], 3), (INPUTS[2], [2, 3], 6),
    (INPUTS[3], [2, 1], 2), (INPUTS[3], [3, 7], 21),
    (TensorSpec(name="grid", dtype="uint8", shape=(None, 2, None)), [2, 3, 2, 5], 60),
])
def test_check_shape_counts_the_values(spec, shape, count):
    assert named.check_shape(shape, spec, MAX_ROWS, "inputs[0]") == count


@pytest.mark.parametrize("spec, shape, want", [
    (INPUTS[0], [2], "[rows, 2]"), (INPUTS[0], [2, 3], "[rows, 2]"), (INPUTS[0], [2, 2, 1], "[rows, 2]"),
    (INPUTS[0], [-1, 2], "[rows, 2]"), (INPUTS[0], [], "[rows, 2]"),
    (INPUTS[1], [2, 1], "[rows]"), (INPUTS[1], [], "[rows]"), (INPUTS[1], [-3], "[rows]"),
    (INPUTS[3], [2], "[rows, any]"), (INPUTS[3], [1, 2, 3], "[rows, any]"),
    (TensorSpec(name="grid", dtype="uint8", shape=(None, 2, None)), [1, 3, 3, 5], "[rows, any, 2, any]"),
])
def test_check_shape_refuses_a_shape_that_is_not_the_inputs(spec, shape, want):
    with refused(InvalidInput, f"inputs[0]: input {spec.name!r} must have shape {want}, got {shape}"):
        named.check_shape(shape, spec, MAX_ROWS, "inputs[0]")


def test_check_shape_shows_ten_dimensions():
    with refused(InvalidInput, f"w: input 'image' must have shape [rows, 2], got {[1] * 10}"):
        named.check_shape([1] * 12, INPUTS[0], MAX_ROWS, "w")


@pytest.mark.parametrize("shape", [[1, 0], [2, -1], [1, -5]])
def test_check_shape_refuses_a_variable_dimension_of_no_length(shape):
    with refused(InvalidInput, f"w: input 'tokens' has a dimension of length {shape[1]}; send at least one value"):
        named.check_shape(shape, INPUTS[3], MAX_ROWS, "w")
    grid = TensorSpec(name="grid", dtype="uint8", shape=(2, None))
    with refused(InvalidInput, f"w: input 'grid' has a dimension of length {shape[1]}; send at least one value"):
        named.check_shape([1, 2, *shape[1:]], grid, MAX_ROWS, "w")


def test_check_shape_checks_the_rows():
    with refused(InvalidInput, "w has 0 rows: send at least one"):
        named.check_shape([0, 2], INPUTS[0], MAX_ROWS, "w")
    with refused(PayloadTooLarge, "w has 5 rows; at most 4 are allowed per request"):
        named.check_shape([5, 2], INPUTS[0], MAX_ROWS, "w")
    assert named.check_shape([4], INPUTS[1], MAX_ROWS, "w") == 4


def test_check_rows():
    assert named.check_rows(1, 4, "w") is None
    assert named.check_rows(4, 4, "w") is None
    with refused(InvalidInput, "inputs[2] has 0 rows: send at least one"):
        named.check_rows(0, 4, "inputs[2]")
    with refused(PayloadTooLarge, "inputs[2] has 5 rows; at most 4 are allowed per request"):
        named.check_rows(5, 4, "inputs[2]")
    with refused(PayloadTooLarge, "x has 100001 rows; at most 1 are allowed per request"):
        named.check_rows(100001, 1, "x")


def test_cast_leaves_strings_and_booleans_and_casts_numbers():
    strings = np.array([b"a", b"b"], dtype=object)
    assert named.cast(strings, INPUTS[1], "w") is strings
    flags = np.array([[True, False, True]])
    assert named.cast(flags, INPUTS[2], "w") is flags
    image = named.cast(np.array([[1, 2]], np.int64), INPUTS[0], "w")
    assert image.dtype == np.float32 and image.tolist() == [[1.0, 2.0]]
    tokens = named.cast(np.array([[1.0, 2.0]]), INPUTS[3], "w")
    assert tokens.dtype == np.int32 and tokens.tolist() == [[1, 2]]
    with refused(InvalidInput, "'w' must hold whole numbers for input dtype int32"):
        named.cast(np.array([[1.5]]), INPUTS[3], "w")
    with refused(InvalidInput, "'w' holds 2147483648 outside the range of input dtype int32 [-2147483648, 2147483647]"):
        named.cast(np.array([[2**31]]), INPUTS[3], "w")
    with refused(InvalidInput, "'w' holds a non-finite number in row 1 (NaN, infinity, or beyond the range of float32)"):
        named.cast(np.array([[1.0, 2.0], [np.inf, 0.0]]), INPUTS[0], "w")


def full(rows=1, **given):
    x = {"image": np.zeros((rows, 2), np.float32), "note": np.array([b"n"] * rows, dtype=object),
         "flags": np.zeros((rows, 3), bool), "tokens": np.zeros((rows, 1), np.int32)}
    return {**x, **given}


def test_check_complete():
    x = full(2)
    got = named.check_complete(x, SIGNATURE)
    assert got == x and got is not x and list(got) == ["image", "note", "flags", "tokens"]
    shuffled = {name: x[name] for name in ("tokens", "flags", "image", "note")}
    assert list(named.check_complete(shuffled, SIGNATURE)) == ["tokens", "flags", "image", "note"]
    with refused(InvalidInput, f"missing inputs ['note', 'tokens']: this model's inputs are {INPUT_NAMES}"):
        named.check_complete({"flags": x["flags"], "image": x["image"]}, SIGNATURE)
    with refused(InvalidInput, f"missing inputs {INPUT_NAMES}: this model's inputs are {INPUT_NAMES}"):
        named.check_complete({}, SIGNATURE)
    with refused(InvalidInput, "the inputs have different numbers of rows: {'image': 2, 'note': 3, 'flags': 2, "
                               "'tokens': 2}"):
        named.check_complete(full(2, note=np.array([b"a"] * 3, dtype=object)), SIGNATURE)


# == Open Inference Protocol: the JSON body ======================================================

NUMERIC_TYPES = "FP32, FP64, INT32, INT64, UINT8, INT16, INT8, UINT16, FP16"
MESSAGE_TYPES = "FP32, FP64, INT32, INT64, UINT8, INT16, INT8, UINT16"


def tensor(name, shape, datatype, data=None, size=None, **extra):
    t = {"name": name, "shape": list(shape), "datatype": datatype, **extra}
    if data is not None:
        t["data"] = data
    if size is not None:
        t["parameters"] = {"binary_data_size": size}
    return t


TOKENS = tensor("tokens", [2, 3], "INT64", [1, 2, 3, 4, 5, 6])
IMAGE = tensor("image", [2, 2], "FP64", [[0.5, 1], [2, -3]])
NOTE = tensor("note", [2], "BYTES", ["hé", {"b64": base64.b64encode(b"\x00\xff").decode()}])
FLAGS = tensor("flags", [2, 3], "BOOL", [True, False, True, False, False, True])
TENSORS = [TOKENS, IMAGE, NOTE, FLAGS]


def decode(payload, binary=b"", signature=SIGNATURE, max_values=10_000):
    body = orjson.dumps(payload)
    return oip.decode_named(body + binary, str(len(body)) if binary else None, signature, MAX_ROWS, max_values)


def test_json_data_of_every_input_is_cast_to_its_dtype():
    request_id, x, outputs, binary, level = decode({"id": "r-1", "inputs": TENSORS})
    assert request_id == "r-1"
    assert list(x) == ["tokens", "image", "note", "flags"]  # as the request orders them
    assert x["tokens"].dtype == np.int32 and x["tokens"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[0.5, 1.0], [2.0, -3.0]]
    assert x["note"].dtype == object and x["note"].shape == (2,) and x["note"].tolist() == ["hé".encode(), b"\x00\xff"]
    assert x["flags"].dtype == bool and x["flags"].tolist() == [[True, False, True], [False, False, True]]
    assert outputs == [("kind", "kind"), ("spam", "spam"), ("tags", "tags"), ("price", "price")]
    assert binary == set() and level == 0.9


@pytest.mark.parametrize("datatype", NUMERIC_TYPES.split(", "))
def test_json_data_of_any_numeric_datatype_is_cast(datatype):
    payload = {"inputs": [tensor("tokens", [1, 2], datatype, [7, 8]), *TENSORS[1:]]}
    payload["inputs"][1] = tensor("image", [2, 2], datatype, [1, 2, 3, 4])
    payload["inputs"][0]["shape"] = [2, 1]
    _, x, *_ = decode(payload)
    assert x["tokens"].dtype == np.int32 and x["tokens"].tolist() == [[7], [8]]
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[1, 2], [3, 4]]


def test_the_id_is_passed_through_as_it_is_and_absent_is_none():
    assert decode({"inputs": TENSORS})[0] is None
    assert decode({"id": 12, "inputs": TENSORS})[0] == 12
    assert decode({"id": {"a": [1]}, "inputs": TENSORS})[0] == {"a": [1]}


def test_binary_parts_of_several_inputs_in_their_order():
    image = np.array([1.5, -2.0, 3.25, 4.0], dtype="<f4").tobytes()
    flags = bytes([0, 1, 2, 0, 0, 255])
    note = b"\x02\x00\x00\x00hi" + b"\x00\x00\x00\x00"
    payload = {"inputs": [tensor("image", [2, 2], "FP32", size=16), tensor("flags", [2, 3], "BOOL", size=6),
                          TOKENS, tensor("note", [2], "BYTES", size=len(note))]}
    _, x, *_ = decode(payload, image + flags + note)
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[1.5, -2.0], [3.25, 4.0]]
    assert x["flags"].dtype == bool and x["flags"].tolist() == [[False, True, True], [False, False, True]]
    assert x["note"].dtype == object and x["note"].tolist() == [b"hi", b""]
    assert x["tokens"].tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("datatype, little_endian", [("FP64", "<f8"), ("INT16", "<i2"), ("UINT8", "u1"),
                                                     ("FP16", "<f2"), ("INT64", "<i8")])
def test_binary_numbers_of_each_datatype_are_little_endian(datatype, little_endian):
    raw = np.array([[1, 2], [3, 250]], dtype=little_endian).tobytes()
    payload = {"inputs": [tensor("image", [2, 2], datatype, size=len(raw)), *TENSORS[:1], *TENSORS[2:]]}
    _, x, *_ = decode(payload, raw)
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[1, 2], [3, 250]]


def test_outputs_asked_for_by_name_with_binary_data():
    outputs = [{"name": "price.upper", "parameters": {"binary_data": True}}, {"name": "kind.label"},
               {"name": "spam.abstain", "parameters": {"binary_data": False}}, {"name": "price"}]
    _, _, wanted, binary, _ = decode({"inputs": TENSORS, "outputs": outputs})
    assert wanted == [("price.upper", "price"), ("kind.label", "kind"), ("spam.abstain", "spam"), ("price", "price")]
    assert binary == {"price.upper"}
    _, _, wanted, binary, _ = decode({"inputs": TENSORS, "outputs": outputs[1:2],
                                      "parameters": {"binary_data_output": True}})
    assert wanted == [("kind.label", "kind")] and binary == {"kind.label"}
    _, _, wanted, binary, _ = decode({"inputs": TENSORS, "parameters": {"binary_data_output": True}})
    assert [name for name, _ in wanted] == ["kind", "spam", "tags", "price"]
    assert binary == {"kind", "spam", "tags", "price"}


def test_an_output_of_a_head_named_like_a_part_names_that_head():
    signature = Signature(inputs=INPUTS, heads=(HeadSpec(name="a", task="binary", labels=("n", "y")),
                                                HeadSpec(name="a.label", task="regression", labels=("t",))))
    _, _, wanted, _, _ = decode({"inputs": TENSORS, "outputs": [{"name": "a.label"}, {"name": "a.label.std"}]},
                                signature=signature)
    assert wanted == [("a.label", "a.label"), ("a.label.std", "a.label")]
    _, _, wanted, _, _ = decode({"inputs": TENSORS}, signature=signature)
    assert wanted == [("a", "a"), ("a.label", "a.label")]


@pytest.mark.parametrize("given, level", [(None, 0.9), (0.5, 0.5), (0.99, 0.99), (1e-3, 1e-3)])
def test_the_interval_parameter(given, level):
    parameters = {} if given is None else {"interval": given}
    assert decode({"inputs": TENSORS, "parameters": parameters})[4] == level
    assert decode({"inputs": TENSORS, "parameters": {"interval": None}})[4] == 0.9


@pytest.mark.parametrize("given, shown", [(1, "1"), (0, "0"), (True, "True"), ("0.9", "0.9"), (1.5, "1.5"),
                                          ([0.5], "[0.5]"), (-0.1, "-0.1")])
def test_an_interval_that_is_no_level_is_refused(given, shown):
    with refused(InvalidInput, f"parameters.interval must be a level between 0 and 1 (e.g. 0.9), got {shown}"):
        decode({"inputs": TENSORS, "parameters": {"interval": given}})


def _without(name):
    return [t for t in TENSORS if t["name"] != name]


B64 = {"b64": base64.b64encode(b"x").decode()}
MISSING_INPUTS = ("missing field 'inputs': send [{\"name\", \"shape\", \"datatype\", \"data\"}, ...], one per input "
                  f"of {INPUT_NAMES}")


@pytest.mark.parametrize("inputs, error, message", [
    (None, InvalidInput, MISSING_INPUTS),
    ([], InvalidInput, MISSING_INPUTS),
    ({"image": 1}, InvalidInput, MISSING_INPUTS),
    ([TOKENS, 3], InvalidInput, "inputs[1] must be an object with a name, shape, datatype and data"),
    ([TOKENS, tensor("pixels", [2, 2], "FP32", [0] * 4)], InvalidInput,
     f"inputs[1] names input 'pixels'; this model's inputs are {INPUT_NAMES}"),
    ([TOKENS, {"shape": [2, 2]}], InvalidInput, f"inputs[1] names input 'None'; this model's inputs are {INPUT_NAMES}"),
    ([TOKENS, IMAGE, TOKENS], InvalidInput, "inputs[2]: input 'tokens' is given twice"),
    (_without("note"), InvalidInput, f"missing inputs ['note']: this model's inputs are {INPUT_NAMES}"),
    ([TOKENS], InvalidInput, f"missing inputs ['image', 'note', 'flags']: this model's inputs are {INPUT_NAMES}"),
    ([tensor("image", "22", "FP32", [0] * 4)], InvalidInput, "inputs[0].shape must be a list of non-negative integers"),
    ([tensor("image", [2, -2], "FP32", [0] * 4)], InvalidInput,
     "inputs[0].shape must be a list of non-negative integers"),
    ([tensor("image", [2, True], "FP32", [0] * 4)], InvalidInput,
     "inputs[0].shape must be a list of non-negative integers"),
    ([tensor("image", [2, 2.0], "FP32", [0] * 4)], InvalidInput,
     "inputs[0].shape must be a list of non-negative integers"),
    ([{"name": "image", "datatype": "FP32", "data": [0] * 4}], InvalidInput,
     "inputs[0].shape must be a list of non-negative integers"),
    ([tensor("image", [2, 3], "FP32", [0] * 6)], InvalidInput,
     "inputs[0]: input 'image' must have shape [rows, 2], got [2, 3]"),
    ([tensor("tokens", [2, 0], "INT32", [])], InvalidInput,
     "inputs[0]: input 'tokens' has a dimension of length 0; send at least one value"),
    ([tensor("image", [0, 2], "FP32", [])], InvalidInput, "inputs[0] has 0 rows: send at least one"),
    ([tensor("image", [5, 2], "FP32", [0] * 10)], PayloadTooLarge,
     "inputs[0] has 5 rows; at most 4 are allowed per request"),
    ([tensor("image", [2, 2], "BYTES", ["a"] * 4)], InvalidInput,
     f"inputs[0].datatype 'BYTES': input 'image' (float32) takes {NUMERIC_TYPES}"),
    ([tensor("image", [2, 2], "BOOL", [True] * 4)], InvalidInput,
     f"inputs[0].datatype 'BOOL': input 'image' (float32) takes {NUMERIC_TYPES}"),
    ([tensor("image", [2, 2], "fp32", [0] * 4)], InvalidInput,
     f"inputs[0].datatype 'fp32': input 'image' (float32) takes {NUMERIC_TYPES}"),
    ([tensor("image", [2, 2], None, [0] * 4)], InvalidInput,
     f"inputs[0].datatype 'None': input 'image' (float32) takes {NUMERIC_TYPES}"),
    ([tensor("image", [2, 2], "X" * 50, [0] * 4)], InvalidInput,
     f"inputs[0].datatype {'X' * 40!r}: input 'image' (float32) takes {NUMERIC_TYPES}"),
    ([tensor("note", [2], "FP32", [0, 1])], InvalidInput, "inputs[0].datatype 'FP32': input 'note' (string) takes BYTES"),
    ([tensor("flags", [2, 3], "UINT8", [0] * 6)], InvalidInput,
     "inputs[0].datatype 'UINT8': input 'flags' (bool) takes BOOL"),
    ([tensor("tokens", [2, 3], "BOOL", [True] * 6)], InvalidInput,
     f"inputs[0].datatype 'BOOL': input 'tokens' (int32) takes {NUMERIC_TYPES}"),
    ([tensor("image", [2, 2], "FP32")], InvalidInput, "inputs[0] has neither 'data' nor parameters.binary_data_size"),
    ([tensor("image", [2, 2], "FP32", [1, 2, 3])], InvalidInput, "inputs[0].data holds 3 values; shape [2, 2] needs 4"),
    ([tensor("note", [2], "BYTES", ["a", "b", "c"])], InvalidInput, "inputs[0].data holds 3 values; shape [2] needs 2"),
    ([tensor("flags", [1, 3], "BOOL", [True])], InvalidInput, "inputs[0].data holds 1 values; shape [1, 3] needs 3"),
    ([tensor("image", [2, 2], "FP32", ["a"] * 4)], InvalidInput, "'inputs[0].data' must hold numbers only; found strings"),
    ([tensor("image", [2, 2], "FP32", [True] * 4)], InvalidInput,
     "'inputs[0].data' must hold numbers only; found true/false"),
    ([tensor("flags", [1, 3], "BOOL", [1, 0, 1])], InvalidInput,
     "'inputs[0].data' must hold true or false only; found values of type int64"),
    ([tensor("note", [2], "BYTES", ["a", 3])], InvalidInput,
     "'inputs[0].data' must hold strings (or {\"b64\": \"...\"}); found int"),
    ([tensor("note", [1], "BYTES", [{"b64": "%%"}])], InvalidInput, "'inputs[0].data' holds invalid base64 in its 0th value"),
    ([tensor("note", [1], "BYTES", [dict(B64, x=1)])], InvalidInput,
     "'inputs[0].data' must hold strings (or {\"b64\": \"...\"}); found dict"),
    ([tensor("tokens", [1, 2], "FP32", [1.5, 2])], InvalidInput,
     "'inputs[0]' must hold whole numbers for input dtype int32"),
    ([tensor("image", [1, 2], "FP64", [1e300, 2])], InvalidInput,
     "'inputs[0]' holds a non-finite number in row 0 (NaN, infinity, or beyond the range of float32)"),
    ([TOKENS, tensor("image", [1, 2], "FP32", [1, 2]), NOTE, FLAGS], InvalidInput,
     "the inputs have different numbers of rows: {'tokens': 2, 'image': 1, 'note': 2, 'flags': 2}"),
    ([TOKENS, tensor("image", [2, 2], "FP32", [0] * 4, parameters=[1])], InvalidInput,
     "inputs[1].parameters must be a JSON object, got a JSON list"),
])
def test_bad_named_inputs_are_refused_naming_the_tensor_and_why(inputs, error, message):
    payload = {} if inputs is None else {"inputs": inputs}
    with refused(error, message):
        decode(payload)


@pytest.mark.parametrize("payload, message", [
    ({"inputs": TENSORS, "outputs": [{"name": "kind.std"}]},
     f"unknown output 'kind.std'; this model has {', '.join(list(CATALOGUE)[:24])}"),
    ({"inputs": TENSORS, "outputs": [{"name": "probabilities"}]},
     f"unknown output 'probabilities'; this model has {', '.join(list(CATALOGUE)[:24])}"),
    ({"inputs": TENSORS, "outputs": {"name": "kind"}}, "'outputs' must be a list of {\"name\": \"...\"}"),
    ({"inputs": TENSORS, "outputs": [{"name": 1}]}, "'outputs' must be a list of {\"name\": \"...\"}"),
    ({"inputs": TENSORS, "parameters": [1]}, "parameters must be a JSON object, got a JSON list"),
    ({"inputs": TENSORS, "outputs": [{"name": "kind", "parameters": 1}]},
     "outputs[0].parameters must be a JSON object, got a JSON int"),
])
def test_bad_outputs_and_parameters_are_refused(payload, message):
    with refused(InvalidInput, message):
        decode(payload)


def _binary_inputs(*tensors):
    return {"inputs": [*tensors, *(t for t in TENSORS if t["name"] not in {x["name"] for x in tensors})]}


@pytest.mark.parametrize("tensors, binary, message", [
    ([tensor("image", [2, 2], "FP32", size=17)], b"\0" * 16,
     "inputs[0] declares binary_data_size 17; the binary part has 16 bytes left for it"),
    ([tensor("image", [2, 2], "FP32", size=16), tensor("flags", [2, 3], "BOOL", size=6)], b"\0" * 20,
     "inputs[1] declares binary_data_size 6; the binary part has 4 bytes left for it"),
    ([tensor("image", [2, 2], "FP32", size=-1)], b"\0" * 16,
     "inputs[0] declares binary_data_size -1; the binary part has 16 bytes left for it"),
    ([tensor("image", [2, 2], "FP32", size=16.0)], b"\0" * 16,
     "inputs[0] declares binary_data_size 16.0; the binary part has 16 bytes left for it"),
    ([tensor("image", [2, 2], "FP32", size=True)], b"\0" * 16,
     "inputs[0] declares binary_data_size True; the binary part has 16 bytes left for it"),
    ([tensor("image", [2, 2], "FP32", size="1" * 30)], b"\0" * 16,
     f"inputs[0] declares binary_data_size {'1' * 20}; the binary part has 16 bytes left for it"),
    ([tensor("image", [2, 2], "FP32", size=12)], b"\0" * 12,
     "inputs[0] has 12 bytes of FP32; 4 values need 16"),
    ([tensor("image", [2, 2], "FP64", size=16)], b"\0" * 16,
     "inputs[0] has 16 bytes of FP64; 4 values need 32"),
    ([tensor("flags", [2, 3], "BOOL", size=5)], b"\0" * 5, "inputs[0] has 5 bytes of BOOL; 6 values need 6"),
    ([tensor("image", [2, 2], "FP32", size=16)], b"\0" * 20,
     "the binary part of the body has 20 bytes; the inputs declare 16"),
    ([], b"\0", "the binary part of the body has 1 bytes; the inputs declare 0"),
    ([tensor("note", [2], "BYTES", size=7)], b"\1\0\0\0a\0\0",
     "inputs[0] has 7 bytes; 2 BYTES elements need at least 8 (each a 4-byte little-endian length, then its bytes)"),
    ([tensor("note", [2], "BYTES", size=9)], b"\5\0\0\0abcd\0",
     "inputs[0]: its bytes end before BYTES element 1 of 2"),
    ([tensor("note", [2], "BYTES", size=10)], b"\1\0\0\0a\3\0\0\0b",
     "inputs[0]: BYTES element 1 declares 3 bytes; 1 are left"),
    ([tensor("note", [2], "BYTES", size=8)], b"\5\0\0\0\0\0\0\0",
     "inputs[0]: BYTES element 0 declares 5 bytes; 4 are left"),
    ([tensor("note", [2], "BYTES", size=11)], b"\1\0\0\0a\1\0\0\0bc",
     "inputs[0] has 1 bytes after its 2 BYTES elements"),
])
def test_bad_binary_parts_are_refused(tensors, binary, message):
    with refused(InvalidInput, message):
        decode(_binary_inputs(*tensors), binary)


def test_a_body_that_is_no_json_object_or_holds_too_many_values_is_refused():
    with refused(MalformedRequest, "request body must be a JSON object, got a JSON list"):
        oip.decode_named(b"[1]", None, SIGNATURE, MAX_ROWS, 100)
    with refused(MalformedRequest, "Inference-Header-Content-Length is 20 but the body has only 12 bytes"):
        oip.decode_named(b'{"inputs":1}', "20", SIGNATURE, MAX_ROWS, 100)
    with refused(PayloadTooLarge, "request body holds more JSON values than the largest valid request (3): send fewer "
                                  "rows (or binary tensors)"):
        decode({"inputs": TENSORS}, max_values=3)


def test_raw_tensor_and_bytes_elements_alone():
    assert oip.raw_tensor(bytes([0, 1, 2, 255]), "BOOL", 4, "w").tolist() == [False, True, True, True]
    assert oip.raw_tensor(bytes([0, 1, 2, 255]), "BOOL", 4, "w").dtype == bool
    ints = oip.raw_tensor(np.array([-2, 3], ">i4").astype("<i4").tobytes(), "INT32", 2, "w")
    assert ints.dtype == np.dtype("<i4") and ints.tolist() == [-2, 3]
    strings = oip.raw_tensor(b"\3\0\0\0abc\0\0\0\0\1\0\0\0\xff", "BYTES", 3, "w")
    assert strings.dtype == object and strings.tolist() == [b"abc", b"", b"\xff"]
    long = b"x" * 300
    assert oip.bytes_elements(b"\x2c\x01\0\0" + long, 1, "w").tolist() == [long]
    with refused(InvalidInput, "w has 3 bytes of INT8; 4 values need 4"):
        oip.raw_tensor(b"\0\0\0", "INT8", 4, "w")


def test_bytes_blob_is_each_length_then_its_bytes():
    assert oip.bytes_blob(np.array([[b"ab", b""], [b"\xff", b"c" * 256]], dtype=object)) == \
        b"\2\0\0\0ab" + b"\0\0\0\0" + b"\1\0\0\0\xff" + b"\0\1\0\0" + b"c" * 256
    assert oip.bytes_blob(np.array([], dtype=object)) == b""
    array = np.array([b"hi", b"", "é".encode()], dtype=object)
    assert oip.bytes_elements(oip.bytes_blob(array), 3, "w").tolist() == array.tolist()


# -- encode_outputs --------------------------------------------------------------------------------

def test_encode_outputs_strings_as_json_text():
    tensors = {"kind.label": np.array([b"a", "é".encode(), b"\xff"], dtype=object),
               "kind": np.array([[0.5, 0.25]], np.float32), "spam.abstain": np.array([True, False])}
    body, header_length = oip.encode_outputs("shop", 7, "r-1", tensors, set())
    assert header_length is None
    assert orjson.loads(body) == {"model_name": "shop", "model_version": "7", "outputs": [
        {"name": "kind.label", "shape": [3], "datatype": "BYTES", "data": ["a", "é", "\ufffd"]},
        {"name": "kind", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.25]},
        {"name": "spam.abstain", "shape": [2], "datatype": "BOOL", "data": [True, False]}], "id": "r-1"}
    body, _ = oip.encode_outputs("shop", 7, None, {"kind": np.array([[1.0]], np.float32)}, set())
    assert "id" not in orjson.loads(body)


def test_encode_outputs_binary_strings_length_prefixed_after_the_header():
    tensors = {"kind": np.array([[0.5, 0.25]], np.float32), "kind.label": np.array([[b"ab"], [b""]], dtype=object),
               "spam.abstain": np.array([True, False]), "price": np.array([[2.0]], ">f4")}
    body, header_length = oip.encode_outputs("shop", 7, 5, tensors, {"kind.label", "spam.abstain", "price"})
    header = orjson.loads(body[:header_length])
    assert header == {"model_name": "shop", "model_version": "7", "id": 5, "outputs": [
        {"name": "kind", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.25]},
        {"name": "kind.label", "shape": [2, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}},
        {"name": "spam.abstain", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
        {"name": "price", "shape": [1, 1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}
    assert body[header_length:] == b"\2\0\0\0ab\0\0\0\0" + b"\1\0" + np.array([2.0], "<f4").tobytes()


def test_decoded_outputs_of_an_answer_encode_as_asked():
    _, _, wanted, binary, level = decode({"inputs": TENSORS, "parameters": {"interval": 0.5}, "outputs": [
        {"name": "kind.label", "parameters": {"binary_data": True}}, {"name": "price.lower"}]})
    a = answer()
    tensors = {name: named.output(a, name, head, level) for name, head in wanted}
    body, header_length = oip.encode_outputs(a.name, a.version, None, tensors, binary)
    header = orjson.loads(body[:header_length])
    assert header["outputs"][0] == {"name": "kind.label", "shape": [2], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": 10}}
    assert body[header_length:] == b"\1\0\0\0a\1\0\0\0c"
    lower = header["outputs"][1]
    assert (lower["shape"], lower["datatype"]) == ([2, 2], "FP32")
    assert lower["data"][0] == pytest.approx(2.0 - z(0.5) * math.sqrt(2.0), rel=1e-6)


# -- metadata ------------------------------------------------------------------------------------

def test_named_metadata():
    signature = Signature(inputs=(*INPUTS, TensorSpec(name="grid", dtype="uint8", shape=(None, 4)),
                                  TensorSpec(name="scale", dtype="float64")), heads=(KIND, SPAM, TAGS, PRICE))
    meta = oip.named_metadata(named_ensemble(signature))
    types = {"float32": "FP32", "string": "BYTES", "bool": "BOOL"}
    assert meta == {
        "name": "shop", "versions": ["7"], "platform": "tensorflow_savedmodel_ensemble",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 2]},
                   {"name": "note", "datatype": "BYTES", "shape": [-1]},
                   {"name": "flags", "datatype": "BOOL", "shape": [-1, 3]},
                   {"name": "tokens", "datatype": "INT32", "shape": [-1, -1]},
                   {"name": "grid", "datatype": "UINT8", "shape": [-1, -1, 4]},
                   {"name": "scale", "datatype": "FP64", "shape": [-1]}],
        "outputs": [{"name": name, "datatype": types[dtype], "shape": [2 if d == -2 else d for d in shape]}
                    for name, (dtype, shape, _) in CATALOGUE.items()],
        "parameters": {"heads": {"kind": {"task": "classification", "labels": ["a", "b", "c"]},
                                 "spam": {"task": "binary", "labels": ["ham", "spam"]},
                                 "tags": {"task": "multilabel", "labels": ["x", "y"]},
                                 "price": {"task": "regression", "labels": ["p", "q"]}},
                       "members": ["m0", "m1"]}}
    assert meta["outputs"][4] == {"name": "kind.members", "datatype": "FP32", "shape": [-1, 2, 3]}
    assert meta["outputs"][5] == {"name": "kind.label", "datatype": "BYTES", "shape": [-1]}
    assert meta["outputs"][14] == {"name": "spam.abstain", "datatype": "BOOL", "shape": [-1]}
    assert oip.model_metadata(named_ensemble(signature)) == meta


def test_named_metadata_counts_the_members():
    ensemble = named_ensemble(Signature(inputs=INPUTS[:1], heads=(TAGS,)))
    ensemble.member_names = ("m0", "m1", "m2", "m3", "m4")
    meta = oip.named_metadata(ensemble)
    assert meta["outputs"][1] == {"name": "tags.members", "datatype": "FP32", "shape": [-1, 5, 2]}
    assert meta["parameters"]["members"] == ["m0", "m1", "m2", "m3", "m4"]


# == Open Inference Protocol: the messages =======================================================

@cache
def v2() -> SimpleNamespace:
    """The service's own `inference.*` messages in a pool of this file's (see the docstring)."""
    source = (Path(gen.__file__).parent / "grpc_predict_v2_pb2.py").read_text()
    serialized = next(node.args[0].value for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    names = ("ModelInferRequest", "ModelInferResponse", "ModelMetadataResponse", "InferParameter")
    return SimpleNamespace(**{name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
                              for name in names})


@pytest.fixture
def pb(monkeypatch):
    """The messages, and oip's responses built with them."""
    monkeypatch.setattr(oip, "messages", v2)
    return v2()


def infer_request(*tensors, raw=None, outputs=()):
    """A ModelInferRequest of (name, datatype, shape, contents field or None, values) tensors."""
    request = v2().ModelInferRequest(model_name="shop", id="r-1")
    for name, datatype, shape, field, values in tensors:
        t = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        if field is not None:
            getattr(t.contents, field).extend(values)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    for name, binary in outputs:
        o = request.outputs.add(name=name)
        if binary is not None:
            o.parameters["binary_data"].bool_param = binary
    return request


TYPED = [("image", "FP32", (2, 2), "fp32_contents", [1.5, -2.0, 3.0, 4.0]),
         ("note", "BYTES", (2,), "bytes_contents", [b"hi", b"\x00\xff"]),
         ("flags", "BOOL", (2, 3), "bool_contents", [True, False, True, False, False, True]),
         ("tokens", "INT8", (2, 2), "int_contents", [-128, 127, 0, 5])]


def test_message_named_typed_contents():
    x = oip.message_named(infer_request(*TYPED), SIGNATURE, MAX_ROWS)
    assert list(x) == ["image", "note", "flags", "tokens"]
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[1.5, -2.0], [3.0, 4.0]]
    assert x["note"].dtype == object and x["note"].shape == (2,) and x["note"].tolist() == [b"hi", b"\x00\xff"]
    assert x["flags"].dtype == bool and x["flags"].tolist() == [[True, False, True], [False, False, True]]
    assert x["tokens"].dtype == np.int32 and x["tokens"].tolist() == [[-128, 127], [0, 5]]


@pytest.mark.parametrize("datatype, field, values", [
    ("FP64", "fp64_contents", [0.5, -1.0, 2.0, 1e30]), ("INT32", "int_contents", [1, -2, 3, 2**31 - 1]),
    ("INT64", "int64_contents", [1, -2, 3, 2**40]), ("UINT8", "uint_contents", [0, 255, 3, 4]),
    ("INT16", "int_contents", [-32768, 32767, 0, 1]), ("UINT16", "uint_contents", [65535, 0, 1, 2]),
])
def test_message_named_numbers_of_each_datatype_cast_to_the_input(datatype, field, values):
    request = infer_request(("image", datatype, (2, 2), field, values), *TYPED[1:])
    x = oip.message_named(request, SIGNATURE, MAX_ROWS)
    assert x["image"].dtype == np.float32
    assert x["image"].tolist() == np.array(values, np.float32).reshape(2, 2).tolist()


def test_message_named_raw_contents_at_each_inputs_position():
    image = np.array([1.5, -2.0, 3.0, 4.0], "<f4").tobytes()
    tokens = np.array([7, -8], "<i8").tobytes()
    request = infer_request(("tokens", "INT64", (2, 1), None, ()), ("flags", "BOOL", (2, 3), None, ()),
                            ("note", "BYTES", (2,), None, ()), ("image", "FP32", (2, 2), "fp32_contents", [9] * 4),
                            raw=[tokens, bytes([0, 1, 2, 0, 0, 9]), b"\2\0\0\0hi\0\0\0\0", image])
    x = oip.message_named(request, SIGNATURE, MAX_ROWS)
    assert list(x) == ["tokens", "flags", "note", "image"]
    assert x["tokens"].dtype == np.int32 and x["tokens"].tolist() == [[7], [-8]]
    assert x["flags"].tolist() == [[False, True, True], [False, False, True]]
    assert x["note"].tolist() == [b"hi", b""]
    assert x["image"].tolist() == [[1.5, -2.0], [3.0, 4.0]]  # raw wins over typed contents


@pytest.mark.parametrize("tensors, raw, error, message", [
    (TYPED, [b""] * 3, InvalidInput, "raw_input_contents holds 3 tensors; 4 inputs were sent"),
    (TYPED[:1], [b"\0" * 16] * 2, InvalidInput, "raw_input_contents holds 2 tensors; 1 inputs were sent"),
    (TYPED[:3], None, InvalidInput, f"missing inputs ['tokens']: this model's inputs are {INPUT_NAMES}"),
    ([], None, InvalidInput, f"missing inputs {INPUT_NAMES}: this model's inputs are {INPUT_NAMES}"),
    ([*TYPED, TYPED[1]], None, InvalidInput, "inputs[4]: input 'note' is given twice"),
    ([("pixels", "FP32", (1, 2), "fp32_contents", [1, 2])], None, InvalidInput,
     f"inputs[0] names input 'pixels'; this model's inputs are {INPUT_NAMES}"),
    ([("image", "FP32", (1, 3), "fp32_contents", [1, 2, 3])], None, InvalidInput,
     "inputs[0]: input 'image' must have shape [rows, 2], got [1, 3]"),
    ([("tokens", "INT32", (1, -1), "int_contents", [])], None, InvalidInput,
     "inputs[0]: input 'tokens' has a dimension of length -1; send at least one value"),
    ([("image", "FP32", (5, 2), "fp32_contents", [0] * 10)], None, PayloadTooLarge,
     "inputs[0] has 5 rows; at most 4 are allowed per request"),
    ([("image", "FP16", (1, 2), None, ())], [b"\0" * 4], InvalidInput,
     f"inputs[0].datatype 'FP16': input 'image' (float32) takes {MESSAGE_TYPES}"),
    ([("note", "FP32", (1,), "fp32_contents", [1])], None, InvalidInput,
     "inputs[0].datatype 'FP32': input 'note' (string) takes BYTES"),
    ([("flags", "INT8", (1, 3), "int_contents", [1, 0, 1])], None, InvalidInput,
     "inputs[0].datatype 'INT8': input 'flags' (bool) takes BOOL"),
    ([("image", "FP32", (2, 2), "fp32_contents", [1, 2, 3])], None, InvalidInput,
     "inputs[0].contents holds 3 values in fp32_contents; shape [2, 2] needs 4"),
    ([("image", "FP32", (2, 2), "fp64_contents", [1, 2, 3, 4])], None, InvalidInput,
     "inputs[0].contents holds 0 values in fp32_contents; shape [2, 2] needs 4"),
    ([("note", "BYTES", (2,), "bytes_contents", [b"a"])], None, InvalidInput,
     "inputs[0].contents holds 1 values in bytes_contents; shape [2] needs 2"),
    ([("flags", "BOOL", (1, 3), "bool_contents", [True])], None, InvalidInput,
     "inputs[0].contents holds 1 values in bool_contents; shape [1, 3] needs 3"),
    ([("tokens", "INT8", (1, 2), "int_contents", [1, 300])], None, InvalidInput,
     "'inputs[0].contents' holds 300 outside the range of input dtype int8 [-128, 127]"),
    ([("tokens", "UINT8", (1, 2), "uint_contents", [256, 1])], None, InvalidInput,
     "'inputs[0].contents' holds 256 outside the range of input dtype uint8 [0, 255]"),
    ([("tokens", "INT64", (1, 2), "int64_contents", [1, 2**31])], None, InvalidInput,
     "'inputs[0]' holds 2147483648 outside the range of input dtype int32 [-2147483648, 2147483647]"),
    ([("tokens", "FP32", (1, 2), "fp32_contents", [1, 2.5])], None, InvalidInput,
     "'inputs[0]' must hold whole numbers for input dtype int32"),
    ([("image", "FP32", (1, 2), None, ())], [b"\0" * 7], InvalidInput,
     "raw_input_contents[0] has 7 bytes of FP32; 2 values need 8"),
    ([("note", "BYTES", (2,), None, ())], [b"\1\0\0\0a\1\0\0\0ab"], InvalidInput,
     "raw_input_contents[0] has 1 bytes after its 2 BYTES elements"),
])
def test_message_named_refusals(tensors, raw, error, message):
    with refused(error, message):
        oip.message_named(infer_request(*tensors, raw=raw), SIGNATURE, MAX_ROWS)


HEAD_NAMES = ("kind", "spam", "tags", "price")


def test_message_outputs_by_default_every_head_raw_as_the_inputs():
    assert oip.message_outputs(infer_request(*TYPED), CATALOGUE, HEAD_NAMES) == \
        [("kind", False), ("spam", False), ("tags", False), ("price", False)]
    raw = infer_request(("image", "FP32", (1, 2), None, ()), raw=[b"\0" * 8])
    assert oip.message_outputs(raw, CATALOGUE, HEAD_NAMES) == [(name, True) for name in HEAD_NAMES]


def test_message_outputs_asked_for_each_with_binary_data():
    request = infer_request(*TYPED, outputs=[("price.upper", True), ("kind.label", None), ("spam.abstain", False)])
    assert oip.message_outputs(request, CATALOGUE, HEAD_NAMES) == \
        [("price.upper", True), ("kind.label", False), ("spam.abstain", False)]
    raw = infer_request(("image", "FP32", (1, 2), None, ()), raw=[b"\0" * 8], outputs=[("kind", False)])
    assert oip.message_outputs(raw, CATALOGUE, HEAD_NAMES) == [("kind", True)]


def test_message_outputs_refuses_an_output_not_in_the_catalogue():
    shown = ", ".join(list(CATALOGUE)[:24])
    with refused(InvalidInput, f"unknown output 'probabilities'; this model has {shown}"):
        oip.message_outputs(infer_request(outputs=[("kind", None), ("probabilities", None)]), CATALOGUE, HEAD_NAMES)
    with refused(InvalidInput, f"unknown output {'o' * 100!r}; this model has {shown}"):
        oip.message_outputs(infer_request(outputs=[("o" * 150, None)]), CATALOGUE, HEAD_NAMES)


def test_message_level_absent_is_the_default():
    assert oip.message_level(infer_request()) == 0.9
    request = infer_request()
    request.parameters["other"].int64_param = 3
    assert oip.message_level(request) == 0.9


@pytest.mark.parametrize("field, value, shown", [("int64_param", 1, "1"), ("int64_param", 0, "0"),
                                                 ("bool_param", True, "True"), ("bool_param", False, "False"),
                                                 ("string_param", "1.5", "1.5"), ("string_param", "", ""),
                                                 ("string_param", "x" * 30, "x" * 20), ("uint64_param", 1, "1"),
                                                 ("double_param", 1.0, "1.0"), ("double_param", 0.0, "0.0")])
def test_message_level_of_another_type_is_refused(field, value, shown):
    request = infer_request()
    setattr(request.parameters["interval"], field, value)
    with refused(InvalidInput, f"parameters['interval'] must be a level between 0 and 1 (e.g. 0.9), got {shown}"):
        oip.message_level(request)


def test_the_services_infer_parameter_has_kserves_fields():
    """The service's InferParameter holds KServe's and Triton's five kinds (a float is a double)."""
    fields = [(f.name, f.number) for f in v2().InferParameter.DESCRIPTOR.fields]
    assert fields == [("bool_param", 1), ("int64_param", 2), ("string_param", 3), ("double_param", 4),
                      ("uint64_param", 5)]


def _contents(tensor) -> list[tuple[str, list]]:
    return [(field.name, list(value)) for field, value in tensor.contents.ListFields()]


def test_named_response_typed_contents(pb):
    outputs = [("kind", False), ("kind.label", False), ("spam.abstain", False), ("price.lower", False),
               ("kind.members", False)]
    reply = oip.named_response(answer(), "r-1", outputs, SIGNATURE, 0.5)
    assert isinstance(reply, pb.ModelInferResponse)
    assert (reply.model_name, reply.model_version, reply.id) == ("shop", "7", "r-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs] == [
        ("kind", "FP32", [2, 3]), ("kind.label", "BYTES", [2]), ("spam.abstain", "BOOL", [2]),
        ("price.lower", "FP32", [2, 2]), ("kind.members", "FP32", [2, 2, 3])]
    kind, label, abstain, lower, members = reply.outputs
    assert _contents(kind) == [("fp32_contents", named.output(answer(), "kind", "kind").reshape(-1).tolist())]
    assert _contents(label) == [("bytes_contents", [b"a", b"c"])]
    assert _contents(abstain) == [("bool_contents", [False, True])]
    assert _contents(lower) == [("fp32_contents", named.output(answer(), "price.lower", "price", 0.5)
                                 .reshape(-1).tolist())]
    assert lower.contents.fp32_contents[0] == np.float32(2.0 - z(0.5) * math.sqrt(2.0))
    assert _contents(members) == [("fp32_contents", KIND_MEMBERS.reshape(-1).tolist())]
    assert list(reply.raw_output_contents) == []


def test_named_response_is_raw_for_every_output_when_one_is_raw(pb):
    outputs = [("kind.label", False), ("price.upper", True), ("spam.abstain", False), ("tags", False)]
    reply = oip.named_response(answer(), "r-2", outputs, SIGNATURE, 0.9)
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs] == [
        ("kind.label", "BYTES", [2]), ("price.upper", "FP32", [2, 2]), ("spam.abstain", "BOOL", [2]),
        ("tags", "FP32", [2, 2])]
    assert all(_contents(t) == [] for t in reply.outputs)
    upper = named.output(answer(), "price.upper", "price", 0.9)
    assert list(reply.raw_output_contents) == [
        b"\1\0\0\0a\1\0\0\0c", upper.astype("<f4").tobytes(), b"\0\1",
        named.output(answer(), "tags", "tags").astype("<f4").tobytes()]


def test_tensors_response_writes_other_arrays_little_endian(pb):
    a = answer()
    tensors = [("big", np.array([[1.5, 2.0]], ">f8"), False), ("ints", np.array([3, -4], ">i8"), False),
               ("strings", np.array([[b"x", b"yz"]], dtype=object), False)]
    typed = oip.tensors_response(a, "r", tensors)
    assert [(t.name, t.datatype, list(t.shape)) for t in typed.outputs] == [
        ("big", "FP64", [1, 2]), ("ints", "INT64", [2]), ("strings", "BYTES", [1, 2])]
    assert [_contents(t) for t in typed.outputs] == [[("fp64_contents", [1.5, 2.0])], [("int64_contents", [3, -4])],
                                                     [("bytes_contents", [b"x", b"yz"])]]
    raw = oip.tensors_response(a, "r", [*tensors[:2], (tensors[2][0], tensors[2][1], True)])
    assert list(raw.raw_output_contents) == [np.array([1.5, 2.0], "<f8").tobytes(), np.array([3, -4], "<i8").tobytes(),
                                             b"\1\0\0\0x\2\0\0\0yz"]


def test_named_metadata_response(pb):
    reply = oip.metadata_response(named_ensemble())
    assert isinstance(reply, pb.ModelMetadataResponse)
    assert (reply.name, list(reply.versions), reply.platform) == ("shop", ["7"], "tensorflow_savedmodel_ensemble")
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.inputs] == [
        ("image", "FP32", [-1, 2]), ("note", "BYTES", [-1]), ("flags", "BOOL", [-1, 3]), ("tokens", "INT32", [-1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs][:6] == [
        ("kind", "FP32", [-1, 3]), ("spam", "FP32", [-1, 1]), ("tags", "FP32", [-1, 2]), ("price", "FP32", [-1, 2]),
        ("kind.members", "FP32", [-1, 2, 3]), ("kind.label", "BYTES", [-1])]
    assert len(reply.outputs) == len(CATALOGUE)


# == TensorFlow Serving ==========================================================================

def dt(name: str) -> int:
    return m.DataType.values_by_name[name].number


def dt_name(number: int) -> str:
    return m.DataType.values_by_number[number].name


def dims(proto) -> list[int]:
    return [d.size for d in proto.tensor_shape.dim]


def predict_request(*tensors, output_filter=()):
    """A PredictRequest of (name, dtype, shape, field or None, values, tensor_content or None) tensors."""
    request = m.PredictRequest(output_filter=list(output_filter))
    request.model_spec.name = "shop"
    for name, dtype, shape, field, values, content in tensors:
        t = request.inputs[name]
        t.dtype = dt(dtype)
        for d in shape:
            t.tensor_shape.dim.add(size=d)
        if field is not None:
            getattr(t, field).extend(values)
        if content is not None:
            t.tensor_content = content
    return request


PREDICT = [("image", "DT_DOUBLE", (2, 2), "double_val", [0.5, 1.0, -2.0, 3.0], None),
           ("note", "DT_STRING", (2,), "string_val", [b"hi", b"\x00\xff"], None),
           ("flags", "DT_BOOL", (2, 3), None, (), bytes([0, 1, 2, 0, 0, 255])),
           ("tokens", "DT_INT64", (2, 1), "int64_val", [7, -8], None)]
TFS_TYPES = ("DT_FLOAT, DT_DOUBLE, DT_HALF, DT_INT8, DT_INT16, DT_INT32, DT_INT64, DT_UINT8, DT_UINT16, "
             "DT_UINT32, DT_UINT64, DT_BOOL, DT_STRING")
TFS_NUMERIC = ("DT_FLOAT, DT_DOUBLE, DT_HALF, DT_INT8, DT_INT16, DT_INT32, DT_INT64, DT_UINT8, DT_UINT16, "
               "DT_UINT32, DT_UINT64")


def test_tfs_message_named_of_every_input():
    x = tfs.message_named(predict_request(*PREDICT), SIGNATURE, MAX_ROWS)
    assert set(x) == {"image", "note", "flags", "tokens"}
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[0.5, 1.0], [-2.0, 3.0]]
    assert x["note"].dtype == object and x["note"].shape == (2,) and x["note"].tolist() == [b"hi", b"\x00\xff"]
    assert x["flags"].dtype == bool and x["flags"].tolist() == [[False, True, True], [False, False, True]]
    assert x["tokens"].dtype == np.int32 and x["tokens"].tolist() == [[7], [-8]]


def test_tfs_one_value_fills_the_shape():
    request = predict_request(("image", "DT_FLOAT", (3, 2), "float_val", [1.5], None),
                              ("note", "DT_STRING", (3,), "string_val", [b"same"], None),
                              ("flags", "DT_BOOL", (3, 3), "bool_val", [True], None),
                              ("tokens", "DT_INT32", (3, 2), "int_val", [4], None))
    x = tfs.message_named(request, SIGNATURE, MAX_ROWS)
    assert x["image"].tolist() == [[1.5, 1.5]] * 3
    assert x["note"].dtype == object and x["note"].tolist() == [b"same"] * 3
    assert x["flags"].dtype == bool and x["flags"].tolist() == [[True] * 3] * 3
    assert x["tokens"].dtype == np.int32 and x["tokens"].tolist() == [[4, 4]] * 3


@pytest.mark.parametrize("dtype, field, values, content", [
    ("DT_FLOAT", None, (), np.array([1, 2, 3, 4], "<f4").tobytes()),
    ("DT_INT16", None, (), np.array([1, 2, 3, 4], "<i2").tobytes()),
    ("DT_UINT8", "int_val", [1, 2, 3, 4], None), ("DT_INT8", "int_val", [1, 2, 3, 4], None),
    ("DT_UINT32", "uint32_val", [1, 2, 3, 4], None), ("DT_UINT64", "uint64_val", [1, 2, 3, 4], None),
    ("DT_HALF", "half_val", [0x3C00, 0x4000, 0x4200, 0x4400], None),
])
def test_tfs_any_numeric_type_is_cast_to_the_input(dtype, field, values, content):
    request = predict_request(("image", dtype, (2, 2), field, values, content), *PREDICT[1:])
    x = tfs.message_named(request, SIGNATURE, MAX_ROWS)
    assert x["image"].dtype == np.float32 and x["image"].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("tensors, error, message", [
    (PREDICT[:3], InvalidInput, f"missing inputs ['tokens']: this model's inputs are {INPUT_NAMES}"),
    ([], InvalidInput, f"missing inputs {INPUT_NAMES}: this model's inputs are {INPUT_NAMES}"),
    ([*PREDICT, ("pixels", "DT_FLOAT", (2, 2), "float_val", [0], None)], InvalidInput,
     f"inputs names input 'pixels'; this model's inputs are {INPUT_NAMES}"),
    ([("image", "DT_STRING", (2, 2), "string_val", [b"a"], None)], InvalidInput,
     f"inputs['image'].dtype DT_STRING: input 'image' (float32) takes {TFS_NUMERIC}"),
    ([("image", "DT_BOOL", (2, 2), "bool_val", [True], None)], InvalidInput,
     f"inputs['image'].dtype DT_BOOL: input 'image' (float32) takes {TFS_NUMERIC}"),
    ([("note", "DT_FLOAT", (2,), "float_val", [1], None)], InvalidInput,
     "inputs['note'].dtype DT_FLOAT: input 'note' (string) takes DT_STRING"),
    ([("flags", "DT_UINT8", (1, 3), "int_val", [1], None)], InvalidInput,
     "inputs['flags'].dtype DT_UINT8: input 'flags' (bool) takes DT_BOOL"),
    ([("image", "DT_COMPLEX64", (1, 2), None, (), b"\0" * 16)], InvalidInput,
     f"inputs['image'].dtype DT_COMPLEX64 is not one of {TFS_TYPES}"),
    ([("note", "DT_STRING", (2, 1), "string_val", [b"a"], None)], InvalidInput,
     "inputs['note']: input 'note' must have shape [rows], got [2, 1]"),
    ([("tokens", "DT_INT32", (1, -1), "int_val", [1], None)], InvalidInput,
     "inputs['tokens']: input 'tokens' has a dimension of length -1; send at least one value"),
    ([("note", "DT_STRING", (0,), "string_val", [b"a"], None)], InvalidInput,
     "inputs['note'] has 0 rows: send at least one"),
    ([("note", "DT_STRING", (5,), "string_val", [b"a"], None)], PayloadTooLarge,
     "inputs['note'] has 5 rows; at most 4 are allowed per request"),
    ([("note", "DT_STRING", (3,), "string_val", [b"a", b"b"], None)], InvalidInput,
     "inputs['note'].string_val holds 2 values; shape [3] needs 3 (or one, which fills it)"),
    ([("note", "DT_STRING", (3,), None, (), b"abc")], InvalidInput,
     "inputs['note'].string_val holds 0 values; shape [3] needs 3 (or one, which fills it)"),
    ([("flags", "DT_BOOL", (1, 3), None, (), b"\1\0")], InvalidInput,
     "inputs['flags'].tensor_content has 2 bytes; shape [1, 3] of DT_BOOL needs 3"),
    ([("flags", "DT_BOOL", (1, 3), "bool_val", [True, False], None)], InvalidInput,
     "inputs['flags'].bool_val holds 2 values; shape [1, 3] needs 3 (or one, which fills it)"),
    ([("tokens", "DT_DOUBLE", (1, 2), "double_val", [1.0, 2.5], None)], InvalidInput,
     "'inputs['tokens']' must hold whole numbers for input dtype int32"),
    ([("tokens", "DT_INT8", (1, 2), "int_val", [1, 200], None)], InvalidInput,
     "'inputs['tokens'].int_val' holds 200 outside the range of input dtype int8 [-128, 127]"),
])
def test_tfs_message_named_refusals(tensors, error, message):
    with refused(error, message):
        tfs.message_named(predict_request(*tensors), SIGNATURE, MAX_ROWS)


def test_tfs_an_unknown_rank_is_refused():
    request = predict_request(("note", "DT_STRING", (), "string_val", [b"a"], None))
    request.inputs["note"].tensor_shape.unknown_rank = True
    with refused(InvalidInput, "inputs['note'].tensor_shape has an unknown rank; send the tensor's shape"):
        tfs.message_named(request, SIGNATURE, MAX_ROWS)


def test_tfs_wanted_of_a_format_2_version():
    ensemble = named_ensemble()
    assert tfs.wanted(m.PredictRequest(), ensemble) == list(CATALOGUE)
    assert tfs.wanted(predict_request(output_filter=["kind.label", "kind", "kind.label"]), ensemble) == \
        ["kind.label", "kind"]
    with refused(InvalidInput, f"output 'predictions' is not in signature 'serving_default'; its outputs are "
                               f"{', '.join(CATALOGUE)}"):
        tfs.wanted(predict_request(output_filter=["kind", "predictions"]), ensemble)


def _infos(infos) -> dict[str, tuple[str, str, list[int]]]:
    return {key: (info.name, dt_name(info.dtype), dims(info)) for key, info in infos.items()}


def test_tfs_signature_def_of_a_format_2_version():
    signature = Signature(inputs=(*INPUTS, TensorSpec(name="grid", dtype="uint8", shape=(None, 4)),
                                  TensorSpec(name="scale", dtype="float64")), heads=(KIND, SPAM, TAGS, PRICE))
    sdef = tfs.signature_def(named_ensemble(signature))
    assert sdef.method_name == "tensorflow/serving/predict"
    assert _infos(sdef.inputs) == {"image": ("image:0", "DT_FLOAT", [-1, 2]), "note": ("note:0", "DT_STRING", [-1]),
                                   "flags": ("flags:0", "DT_BOOL", [-1, 3]),
                                   "tokens": ("tokens:0", "DT_INT32", [-1, -1]),
                                   "grid": ("grid:0", "DT_UINT8", [-1, -1, 4]),
                                   "scale": ("scale:0", "DT_DOUBLE", [-1])}
    types = {"float32": "DT_FLOAT", "string": "DT_STRING", "bool": "DT_BOOL"}
    assert _infos(sdef.outputs) == {name: (f"{name}:0", types[dtype], [2 if d == -2 else d for d in shape])
                                    for name, (dtype, shape, _) in CATALOGUE.items()}
    assert _infos(sdef.outputs)["kind.members"] == ("kind.members:0", "DT_FLOAT", [-1, 2, 3])
    assert _infos(sdef.outputs)["spam.abstain"] == ("spam.abstain:0", "DT_BOOL", [-1])


def test_tfs_named_response_as_tensor_protos():
    ensemble, a = named_ensemble(), answer()
    names = ["kind.label", "spam.label", "kind", "spam.abstain", "price.upper", "kind.members"]
    reply = tfs.named_response(a, ensemble, names)
    assert (reply.model_spec.name, reply.model_spec.version.value, reply.model_spec.signature_name) == \
        ("shop", 7, "serving_default")
    outputs = reply.outputs
    assert set(outputs) == set(names)
    assert (dt_name(outputs["kind.label"].dtype), dims(outputs["kind.label"])) == ("DT_STRING", [2])
    assert list(outputs["kind.label"].string_val) == [b"a", b"c"]  # the labels' bytes, not "b'a'"
    assert list(outputs["spam.label"].string_val) == [b"spam", b"spam"]
    assert (dt_name(outputs["kind"].dtype), dims(outputs["kind"])) == ("DT_FLOAT", [2, 3])
    assert outputs["kind"].tensor_content == named.output(a, "kind", "kind").astype("<f4").tobytes()
    assert (dt_name(outputs["spam.abstain"].dtype), outputs["spam.abstain"].tensor_content) == ("DT_BOOL", b"\0\1")
    upper = np.frombuffer(outputs["price.upper"].tensor_content, "<f4").reshape(dims(outputs["price.upper"]))
    assert upper.tolist() == named.output(a, "price.upper", "price", 0.9).tolist()  # the default level
    assert upper[0, 0] == np.float32(2.0 + z(0.9) * math.sqrt(2.0))
    assert dims(outputs["kind.members"]) == [2, 2, 3]
    assert outputs["kind.members"].tensor_content == KIND_MEMBERS.astype("<f4").tobytes()


# == Bytes in flight: decoded strings ===========================================================

def test_decoded_bytes():
    assert STRING_OVERHEAD == 41
    assert decoded_bytes(np.zeros((3, 2), dtype=object)) == 0  # not a format-2 request's inputs
    assert decoded_bytes(np.array([b"abc"], dtype=object)) == 0
    assert decoded_bytes({}) == 0
    assert decoded_bytes(full(2)) == 2 * 41 + 2  # the note's two strings of one byte
    notes = np.array([[b"hello", b""], [b"\xff" * 100, b"xy"]], dtype=object)
    assert decoded_bytes({"image": np.zeros((2, 2), np.float32), "note": notes}) == 4 * 41 + 5 + 0 + 100 + 2
    assert decoded_bytes({"a": notes, "b": np.array([b"z"], dtype=object)}) == 4 * 41 + 107 + 41 + 1
    assert decoded_bytes({"image": np.zeros((100, 2)), "flags": np.ones((3, 3), bool)}) == 0


class Ensemble:
    """A format-2 ensemble as the data plane uses it: its name, and an answer of some outputs."""

    name = "shop"
    ANSWER = object()

    def __init__(self):
        self.answered = []

    def answer(self, outputs):
        self.answered.append(outputs)
        return self.ANSWER


def plane(budget=10_000, small_pool=1_000, per_peer=None):
    """A DataPlane over a runtime of doubles: the batcher records what it is given."""
    submitted, rows = [], []

    async def submit(ensemble, x, deadline):
        submitted.append((ensemble, x, deadline))
        return ("outputs",)

    metrics = SimpleNamespace(observe_rows=lambda name, n: rows.append((name, n)))
    runtime = SimpleNamespace(settings=SimpleNamespace(), metrics=metrics, manager=SimpleNamespace(),
                              batcher=SimpleNamespace(submit=submit),
                              inflight=InflightBytes(budget, small_pool, per_peer))
    return DataPlane(runtime), submitted, rows


def test_infer_grows_the_hold_by_what_the_decoded_strings_hold():
    dataplane, submitted, rows = plane()
    inflight, ensemble = dataplane.inflight, Ensemble()
    hold = Hold("10.0.0.1")
    assert inflight.grow(hold, 100)
    x = full(3, note=np.array([b"abc", b"", b"hello"], dtype=object))
    got = asyncio.run(dataplane.infer(ensemble, x, 12.5, hold))
    assert got is Ensemble.ANSWER and ensemble.answered == [("outputs",)]
    extra = 3 * 41 + 8
    assert decoded_bytes(x) == extra
    assert (hold.small, hold.large) == (100 + extra, 0)
    assert (inflight.small, inflight.large, inflight.held_by("10.0.0.1")) == (100 + extra, 0, 100 + extra)
    assert submitted == [(ensemble, x, 12.5)] and rows == [("shop", 3)]
    inflight.release_hold(hold)
    assert inflight.held == 0


def test_infer_moves_a_hold_past_the_small_pool_to_the_budget():
    dataplane, _, _ = plane(budget=200_000, small_pool=70_000)
    hold = Hold("p")
    assert dataplane.inflight.grow(hold, 60_000)
    x = full(1, note=np.array([b"x" * 10_000], dtype=object))
    asyncio.run(dataplane.infer(Ensemble(), x, None, hold))
    assert (hold.small, hold.large) == (0, 70_041)
    assert (dataplane.inflight.small, dataplane.inflight.large) == (0, 70_041)


def test_infer_refuses_strings_past_the_budget_holding_nothing_more():
    dataplane, submitted, rows = plane(small_pool=150)
    hold = Hold("p")
    assert dataplane.inflight.grow(hold, 100)
    x = full(1, note=np.array([b"abcdefghij"], dtype=object))  # 51 more: 151 > 150
    with refused(BytesInFlight, "the server holds 100 bytes of small requests being received or answered; 51 more "
                                "would pass their limit of 150"):
        asyncio.run(dataplane.infer(Ensemble(), x, None, hold))
    assert (hold.small, hold.large, dataplane.inflight.held) == (100, 0, 100)
    assert submitted == [] and rows == []
    asyncio.run(dataplane.infer(Ensemble(), full(1, note=np.array([b"abcdefghi"], dtype=object)), None, hold))
    assert hold.small == 150  # exactly the pool


def test_infer_refuses_strings_past_the_peers_limit():
    dataplane, _, _ = plane(per_peer=120)
    hold = Hold("p")
    assert dataplane.inflight.grow(hold, 100)
    with refused(BytesInFlight, "this client holds 100 bytes of requests being received or answered; 42 more "
                                "would pass the limit of 120 per client"):
        asyncio.run(dataplane.infer(Ensemble(), full(1), None, hold))
    assert hold.small == 100


def test_infer_without_a_hold_or_strings_holds_nothing_more():
    dataplane, submitted, rows = plane(small_pool=10)
    x = full(2)
    assert asyncio.run(dataplane.infer(Ensemble(), x, None)) is Ensemble.ANSWER  # no hold: nothing counted
    assert dataplane.inflight.held == 0
    hold = Hold("p")
    assert dataplane.inflight.grow(hold, 10)
    numbers = {"image": np.zeros((2, 2), np.float32), "tokens": np.zeros((2, 5), np.int32)}
    asyncio.run(dataplane.infer(Ensemble(), numbers, None, hold))
    array = np.zeros((4, 2), np.float32)
    asyncio.run(dataplane.infer(Ensemble(), array, None, hold))
    assert (hold.small, hold.large, dataplane.inflight.held) == (10, 0, 10)
    assert [s[1] for s in submitted][1:] == [numbers, array] and rows == [("shop", 2), ("shop", 2), ("shop", 4)]


# == A level over gRPC ===========================================================================

def _double_parameter(value: float) -> bytes:
    """An InferParameter holding double_param = `value` on the wire (field 4, 64 bits), as a
    KServe client (tritonclient, KServe's own Python client) sends a float parameter."""
    return b"\x21" + struct.pack("<d", value)


def test_message_level_of_a_double_interval_as_kserve_clients_send_it():
    request = infer_request()
    request.parameters["interval"].MergeFromString(_double_parameter(0.8))
    assert oip.message_level(request) == 0.8
    request.parameters["interval"].string_param = "0.25"  # or as text
    assert oip.message_level(request) == 0.25


def test_message_level_of_an_empty_interval_parameter_is_refused():
    request = infer_request()
    request.parameters["interval"].SetInParent()
    with pytest.raises(InvalidInput, match=r"^parameters\['interval'\] holds no value; send a level between 0 and 1 "
                                           r"\(e\.g\. 0\.9\)$"):
        oip.message_level(request)


# == Nullable inputs: a missing value in every tensor protocol ===================================

# `bmi` takes NaN and `sex` the empty string as a missing value; `age` takes neither.
MISSING = Signature(inputs=(TensorSpec(name="bmi", dtype="float32", shape=(2,), nullable=True),
                            TensorSpec(name="sex", dtype="string", nullable=True), TensorSpec(name="age", dtype="float32")),
                    heads=(KIND,))
NAN, INF = float("nan"), float("inf")
AGE_NAN = "'{}' holds NaN (a missing value) in row 1; input 'age' does not take missing values"
BMI_INF = ("'{}' holds infinity in row 1 (or a number beyond the range of float32); input 'bmi' takes NaN as its "
           "missing value, not infinity")


def missing_at(array: np.ndarray) -> list:
    return np.isnan(array).tolist()


def test_cast_takes_nan_in_a_nullable_float_input_only():
    bmi = named.cast(np.array([[NAN, 1.0], [2.0, NAN]]), MISSING.inputs[0], "w")
    assert bmi.dtype == np.float32 and missing_at(bmi) == [[True, False], [False, True]] and bmi[0, 1] == 1.0
    with refused(InvalidInput, AGE_NAN.format("w")):
        named.cast(np.array([1.0, NAN]), MISSING.inputs[2], "w")
    with refused(InvalidInput, BMI_INF.format("w")):
        named.cast(np.array([[NAN, 1.0], [-INF, NAN]]), MISSING.inputs[0], "w")
    with refused(InvalidInput, BMI_INF.format("w")):
        named.cast(np.array([[NAN, 1.0], [1e300, 0.0]]), MISSING.inputs[0], "w")  # beyond float32 is infinity
    with refused(InvalidInput, "'w' holds a non-finite number in row 1 (NaN, infinity, or beyond the range of float32)"):
        named.cast(np.array([1.0, INF]), MISSING.inputs[2], "w")  # infinity where no missing value is taken: as ever
    sex = np.array([b"", b"m"], dtype=object)
    assert named.cast(sex, MISSING.inputs[1], "w") is sex


def test_oip_json_nulls_are_the_missing_values_of_nullable_inputs():
    _, x, _, _, _ = decode({"inputs": [tensor("bmi", [2, 2], "FP32", [None, 1.5, 2, None]),
                                       tensor("sex", [2], "BYTES", ["f", None]), tensor("age", [2], "FP64", [40, 41])]},
                           signature=MISSING)
    assert x["bmi"].dtype == np.float32 and missing_at(x["bmi"]) == [[True, False], [False, True]]
    assert x["bmi"][0, 1] == 1.5 and x["sex"].tolist() == [b"f", b""] and x["age"].tolist() == [40.0, 41.0]


@pytest.mark.parametrize("inputs, message", [
    ([tensor("bmi", [2, 2], "FP32", [0] * 4), tensor("sex", [2], "BYTES", ["f", "m"]),
      tensor("age", [2], "FP32", [40, None])],
     "'inputs[2].data' holds null (a missing value); input 'age' does not take missing values"),
    ([tensor("bmi", [2, 2], "FP64", [None, 1, 2, 1e300]), tensor("sex", [2], "BYTES", ["f", "m"]),
      tensor("age", [2], "FP32", [40, 41])], BMI_INF.format("inputs[0]")),
    ([tensor("bmi", [2, 2], "FP32", [None, True, 1, 2]), tensor("sex", [2], "BYTES", ["f", "m"]),
      tensor("age", [2], "FP32", [40, 41])], "'inputs[0].data' must hold numbers only; found null or mixed values"),
    ([tensor("bmi", [2, 2], "INT32", [None, 1, 2, 3]), tensor("sex", [2], "BYTES", ["f", "m"]),
      tensor("age", [2], "FP32", [40, 41])], None),  # an integer datatype sent to a float input: a null is NaN
])
def test_oip_json_refuses_a_null_where_no_missing_value_is_taken_and_infinity(inputs, message):
    if message is None:
        _, x, _, _, _ = decode({"inputs": inputs}, signature=MISSING)
        assert missing_at(x["bmi"]) == [[True, False], [False, False]]
        return
    with refused(InvalidInput, message):
        decode({"inputs": inputs}, signature=MISSING)
    plain = Signature(inputs=(TensorSpec(name="note", dtype="string"),), heads=(KIND,))
    with refused(InvalidInput, "'inputs[0].data' holds null (a missing value); input 'note' does not take missing values"):
        decode({"inputs": [tensor("note", [2], "BYTES", ["a", None])]}, signature=plain)


def _raw_missing(bmi, age, sex=b"\1\0\0\0f\0\0\0\0"):
    """A binary body of MISSING's three inputs: bmi and age as FP32 values, sex as BYTES."""
    raws = (np.array(bmi, "<f4").tobytes(), sex, np.array(age, "<f4").tobytes())
    tensors = [tensor(name, shape, datatype, size=len(raw))
               for (name, shape, datatype), raw in zip((("bmi", [2, 2], "FP32"), ("sex", [2], "BYTES"),
                                                        ("age", [2], "FP32")), raws)]
    return {"inputs": tensors}, b"".join(raws)


def test_oip_binary_nan_is_taken_by_a_nullable_float_input_only():
    _, x, _, _, _ = decode(*_raw_missing([NAN, 1, 2, NAN], [40, 41]), signature=MISSING)
    assert missing_at(x["bmi"]) == [[True, False], [False, True]] and x["sex"].tolist() == [b"f", b""]
    with refused(InvalidInput, AGE_NAN.format("inputs[2]")):
        decode(*_raw_missing([NAN, 1, 2, NAN], [40, NAN]), signature=MISSING)
    with refused(InvalidInput, BMI_INF.format("inputs[0]")):
        decode(*_raw_missing([NAN, 1, INF, NAN], [40, 41]), signature=MISSING)


def test_oip_messages_take_nan_in_a_nullable_float_input_and_an_empty_bytes_element():
    typed = [("bmi", "FP32", (2, 2), "fp32_contents", [NAN, 1, 2, NAN]), ("sex", "BYTES", (2,), "bytes_contents", [b"", b"m"]),
             ("age", "FP64", (2,), "fp64_contents", [40, 41])]
    x = oip.message_named(infer_request(*typed), MISSING, MAX_ROWS)
    assert missing_at(x["bmi"]) == [[True, False], [False, True]] and x["sex"].tolist() == [b"", b"m"]
    raw = [np.array([NAN, 1, 2, 3], "<f4").tobytes(), b"\0\0\0\0\1\0\0\0m", np.array([40, 41], "<f4").tobytes()]
    request = infer_request(*((name, datatype, shape, None, ()) for name, datatype, shape, _, _ in typed[:2]),
                            ("age", "FP32", (2,), None, ()), raw=raw)
    x = oip.message_named(request, MISSING, MAX_ROWS)
    assert missing_at(x["bmi"]) == [[True, False], [False, False]] and x["sex"].tolist() == [b"", b"m"]
    with refused(InvalidInput, AGE_NAN.format("inputs[2]")):
        oip.message_named(infer_request(*typed[:2], ("age", "FP32", (2,), "fp32_contents", [40, NAN])), MISSING, MAX_ROWS)
    with refused(InvalidInput, BMI_INF.format("inputs[0]")):
        oip.message_named(infer_request(("bmi", "FP32", (2, 2), "fp32_contents", [NAN, 1, INF, 0]), *typed[1:]),
                          MISSING, MAX_ROWS)


def test_tfs_predict_takes_nan_in_a_nullable_float_input_and_an_empty_string():
    sex = ("sex", "DT_STRING", (2,), "string_val", [b"", b"m"], None)
    age = ("age", "DT_FLOAT", (2,), "float_val", [40, 41], None)
    content = np.array([NAN, 1, 2, NAN], "<f4").tobytes()
    x = tfs.message_named(predict_request(("bmi", "DT_FLOAT", (2, 2), None, (), content), sex, age), MISSING, MAX_ROWS)
    assert x["bmi"].dtype == np.float32 and missing_at(x["bmi"]) == [[True, False], [False, True]]
    assert x["sex"].tolist() == [b"", b"m"]
    x = tfs.message_named(predict_request(("bmi", "DT_DOUBLE", (2, 2), "double_val", [NAN], None), sex, age),
                          MISSING, MAX_ROWS)
    assert missing_at(x["bmi"]) == [[True, True], [True, True]]  # one value fills the shape
    with refused(InvalidInput, AGE_NAN.format("inputs['age']")):
        tfs.message_named(predict_request(("bmi", "DT_FLOAT", (2, 2), None, (), content), sex,
                                          ("age", "DT_FLOAT", (2,), "float_val", [40, NAN], None)), MISSING, MAX_ROWS)
    with refused(InvalidInput, BMI_INF.format("inputs['bmi']")):
        tfs.message_named(predict_request(("bmi", "DT_FLOAT", (2, 2), "float_val", [NAN, 1, INF, 2], None), sex, age),
                          MISSING, MAX_ROWS)


def test_nullable_inputs_in_the_metadata_where_the_format_has_room():
    meta = oip.named_metadata(named_ensemble(MISSING))
    assert meta["parameters"]["nullable"] == ["bmi", "sex"]  # among the service's own parameters
    assert meta["inputs"] == [{"name": "bmi", "datatype": "FP32", "shape": [-1, 2]},
                              {"name": "sex", "datatype": "BYTES", "shape": [-1]},
                              {"name": "age", "datatype": "FP32", "shape": [-1]}]  # the protocol's tensor: as ever
    assert "nullable" not in oip.named_metadata(named_ensemble())["parameters"]  # none nullable: as before
    assert _infos(tfs.signature_def(named_ensemble(MISSING)).inputs) == {
        "bmi": ("bmi:0", "DT_FLOAT", [-1, 2]), "sex": ("sex:0", "DT_STRING", [-1]), "age": ("age:0", "DT_FLOAT", [-1])}


def test_nullable_inputs_are_not_in_the_grpc_metadata_which_has_no_field_for_them(pb):
    reply = oip.metadata_response(named_ensemble(MISSING))
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.inputs] == [
        ("bmi", "FP32", [-1, 2]), ("sex", "BYTES", [-1]), ("age", "FP32", [-1])]
    assert "nullable" not in str(reply)


def test_a_missing_string_counts_in_the_bytes_in_flight_as_any_string():
    assert decoded_bytes({"sex": np.array([b"", b"", b"m"], dtype=object), "bmi": np.full((3, 2), np.nan)}) == 3 * 41 + 1
