"""Bring your own members: publish SavedModels or `.keras` files made elsewhere as a version.

Every input and output is read from the members themselves (a `.keras` model's inputs and
outputs, a SavedModel's `serving_default` signature): one tensor or named (dict) inputs, several
outputs, variable dimensions, strings, bools and integers; the members must agree on them. Each
head's task is read where the model says it unambiguously (a `.keras` model's final activation;
a SavedModel whose rows sum to one), else it is given (`tasks`, the CLI's `--task`). Every
member is run on a few generated rows and each head's values are checked against its task
before anything is published.

One input of a fixed numeric shape and one classification head is published in manifest format
1, as the trainer publishes (a `serve` endpoint taking `instances`). Anything else is published in
format 2 (contract.manifest.ManifestV2): each member is re-exported so that its `serving_default`
signature takes every input and gives every head by its manifest name, which is what the
service's named engine checks (service.engines.named.check_member).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from pydantic import ValidationError

from contract.manifest import (
    SUPPORTED_DTYPES, TASKS, VALUE_DTYPES, HeadSpec, InputSpec, Manifest, ManifestV2, OutputSpec, TensorSpec,
    uniform_weights,
)
from contract.store import RemoteStore
from training.publish import MemberArtifact, PublishError, publish_named_version, publish_version

_SMOKE_ROWS = 4
_SMOKE_LENGTH = 4  # the length a variable dimension gets in the smoke rows
_SMOKE_INTEGERS = 4  # integers 0..3: indices that any Embedding or lookup takes
_SMOKE_WORDS = ("good", "a bad film", "very good indeed", "unknown words")
_SMOKE_SEED = 0
_PROBABILITY_SLACK = 1e-3
TASK_CHOICES = ", ".join(TASKS)
# Names Keras makes up for an input or output that was not named (they differ between models).
_AUTOMATIC_INPUT = re.compile(r"(input_layer|keras_tensor|input)(_\d+)?")
_AUTOMATIC_OUTPUT = re.compile(r"output_\d+")


class MemberImportError(PublishError):
    """A member cannot be imported; the message names it, the input or head, and why."""


@dataclass
class Port:
    """One input or output of a member: `name` (the manifest's), `key` (how the member is fed or
    read: a dict key, a position, a signature argument), whether Keras made the name up, and for
    an output what its end says of its task (`task`, None if nothing unambiguous; `says`, words
    for messages)."""

    name: str
    key: str | int
    automatic: bool = False
    spec: TensorSpec | None = None
    task: str | None = None
    says: str = ""
    reads_values: bool = False  # a SavedModel's output: only its values can say its task


@dataclass
class ForeignMember:
    """A member read from its file: its ports, a function of tensors by input key to tensors by
    output key (usable inside a `tf.function`), and what to track when exporting it."""

    source: Path
    inputs: list[Port]
    outputs: list[Port]
    call: Callable[[dict], dict]
    resource: object
    dict_inputs: bool = False
    values: dict[str, np.ndarray] = field(default_factory=dict)  # smoke values by head name

    def port(self, name: str) -> Port:
        return next(p for p in self.outputs if p.name == name)


# -- reading a member ----------------------------------------------------------------------------


def _automatic_layer_name(layer) -> bool:
    """Whether a layer's name is one Keras gave it (its class in snake case, perhaps numbered)."""
    base = re.sub(r"([a-z])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", type(layer).__name__)).lower()
    return re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name) is not None


def _producer(model, tensor):
    """The layer of `model` whose output is `tensor` (None: an operation, not a layer)."""
    for layer in model.layers:
        try:
            if layer.output is tensor:
                return layer
        except (AttributeError, ValueError):  # a layer called several times has no one output
            continue
    return None


def task_of_activation(activation: str | None, width: int | None, where: str) -> tuple[str | None, str]:
    """(task, words) a head's final activation says: softmax over k >= 2 classification, one
    sigmoid binary, k sigmoids multilabel, one linear unit regression; else (None, why not)."""
    units = f"{width} unit{'s' if width != 1 else ''}"
    if activation is None:
        return None, f"ends in {where}, which has no activation to read"
    if activation == "softmax" and width and width >= 2:
        return "classification", f"ends in a softmax over {units}"
    if activation == "sigmoid" and width:
        return ("binary" if width == 1 else "multilabel"), f"ends in {units} with a sigmoid"
    if activation == "linear" and width == 1:
        return "regression", "ends in one linear unit"
    if activation == "linear":
        return None, (f"ends in {width or 'several'} linear units ({where}), which are not probabilities: a "
                      "classifier's logits (end the model with a softmax) or regression targets")
    return None, f"ends in {units} with a {activation} activation ({where})"


def _activation_of(layer) -> str | None:
    import keras

    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", None)


def _spec(source: Path, name: str, dtype: str, shape) -> TensorSpec:
    if dtype not in VALUE_DTYPES:
        raise MemberImportError(f"{source}: input {name!r} has dtype {dtype}; an input may be one of "
                                f"{', '.join(VALUE_DTYPES)}")
    try:
        return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))
    except ValidationError as exc:
        raise MemberImportError(f"{source}: input {name!r} cannot be served: {exc.errors()[0]['msg']}") from None


def _read_keras(source: Path) -> ForeignMember:
    import keras

    try:
        # safe_mode=True, said rather than relied on: a .keras file's config may not name
        # arbitrary Python (lambdas, unknown modules) to run while loading.
        model = keras.models.load_model(str(source), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for unreadable files
        raise MemberImportError(f"{source}: cannot load the .keras file: {exc}") from None
    try:
        structure = model.input
    except (AttributeError, ValueError):  # a Sequential model loaded from a file has only `inputs`
        structure = model.inputs[0] if len(model.inputs) == 1 else list(model.inputs)
    dict_inputs, list_inputs = isinstance(structure, dict), isinstance(structure, (list, tuple))
    tensors = list(structure.items()) if dict_inputs else list(enumerate(structure if list_inputs else [structure]))
    inputs = []
    for i, (key, tensor) in enumerate(tensors):
        automatic = not dict_inputs and _AUTOMATIC_INPUT.fullmatch(tensor.name) is not None
        name = key if dict_inputs else (f"input_{i}" if automatic else tensor.name)
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        inputs.append(Port(name, key, automatic, _spec(source, name, dtype, tensor.shape[1:])))

    results = model.outputs if isinstance(model, keras.Sequential) else model.output
    dict_outputs = isinstance(results, dict)
    results = list(results.items()) if dict_outputs else list(enumerate(
        results if isinstance(results, (list, tuple)) else [results]))
    outputs = []
    for i, (key, tensor) in enumerate(results):
        layer = _producer(model, tensor)
        automatic = not dict_outputs and (layer is None or _automatic_layer_name(layer))
        # a head's name: its dict key, else its layer's (where someone named it), else its place
        name = key if dict_outputs else (f"output_{i}" if automatic else layer.name)
        where = (f"a {type(layer).__name__} layer ({layer.name})" if layer is not None
                 else "an operation that is not a layer")
        task, says = task_of_activation(_activation_of(layer) if layer is not None else None,
                                        tensor.shape[-1] if len(tensor.shape) > 1 else 1, where)
        outputs.append(Port(name, key, automatic, task=task, says=says))

    def call(feeds: dict) -> dict:
        if dict_inputs:
            x = dict(feeds)
        else:
            x = [feeds[i] for i in range(len(inputs))] if list_inputs else feeds[0]
        out = model(x, training=False)
        if isinstance(out, dict):
            return out
        return dict(enumerate(out if isinstance(out, (list, tuple)) else [out]))

    return ForeignMember(source, inputs, outputs, call, model, dict_inputs)


def _read_saved_model(source: Path) -> ForeignMember:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(source))
    except Exception as exc:  # TF raises many types for unreadable SavedModels
        raise MemberImportError(f"{source}: cannot load SavedModel: {exc}") from None
    says = "comes from a SavedModel, whose signature does not say its activation"
    if "serving_default" in getattr(loaded, "signatures", {}):
        signature = loaded.signatures["serving_default"]
        # a signature's dicts have no stable order: by name, so that every import lists them alike
        specs = sorted(signature.structured_input_signature[1].items())
        outputs = [Port(name, name, _AUTOMATIC_OUTPUT.fullmatch(name) is not None, says=says, reads_values=True)
                   for name in sorted(signature.structured_outputs)]

        def call(feeds: dict) -> dict:
            return signature(**feeds)
    elif getattr(getattr(loaded, "serve", None), "input_signature", None):
        serve = loaded.serve
        specs = list(enumerate(serve.input_signature))
        outputs = None  # known once it has run

        def call(feeds: dict) -> dict:
            out = serve(*[feeds[i] for i in range(len(specs))])
            return out if isinstance(out, dict) else dict(enumerate(out if isinstance(out, (list, tuple)) else [out]))
    else:
        raise MemberImportError(f"{source}: no 'serve' endpoint and no 'serving_default' signature")
    inputs = []
    for i, (key, spec) in enumerate(specs):
        if spec.shape.rank is None or spec.shape.rank < 1:
            raise MemberImportError(f"{source}: input {key!r} has shape {spec.shape}: it needs a batch dimension")
        given = key if isinstance(key, str) else spec.name
        automatic = not given or _AUTOMATIC_INPUT.fullmatch(given) is not None
        name = f"input_{i}" if automatic else given
        inputs.append(Port(name, key, automatic, _spec(source, name, spec.dtype.name, spec.shape.as_list()[1:])))
    member = ForeignMember(source, inputs, outputs or [], call, loaded)
    if outputs is None:
        produced = _call_on_smoke_rows(member)
        member.outputs = [Port(f"output_{k}" if isinstance(k, int) else k, k, isinstance(k, int), says=says,
                               reads_values=True) for k in sorted(produced, key=str)]
    return member


def read_member(source: Path) -> ForeignMember:
    """Load one SavedModel folder or `.keras` file and read its inputs and outputs."""
    if source.suffix == ".keras" and source.is_file():
        return _read_keras(source)
    if source.is_dir():
        return _read_saved_model(source)
    raise MemberImportError(f"{source}: not a SavedModel folder or a .keras file")


# -- the smoke test ------------------------------------------------------------------------------


def smoke_rows(specs: list[TensorSpec], rows: int = _SMOKE_ROWS) -> dict[str, np.ndarray]:
    """A few generated rows of every input: numbers in [0, 1), integers 0..3, random bools, a
    few short words; a variable dimension of length 4."""
    rng = np.random.default_rng(_SMOKE_SEED)
    batch = {}
    for spec in specs:
        shape = (rows, *(d if d is not None else _SMOKE_LENGTH for d in spec.shape))
        if spec.dtype == "string":
            batch[spec.name] = rng.choice(np.array([w.encode() for w in _SMOKE_WORDS], dtype=object), size=shape)
        elif spec.dtype == "bool":
            batch[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif spec.dtype.startswith(("int", "uint")):
            batch[spec.name] = rng.integers(0, _SMOKE_INTEGERS, size=shape).astype(spec.dtype)
        else:
            batch[spec.name] = rng.uniform(0.0, 1.0, size=shape).astype(spec.dtype)
    return batch


def _call_on_smoke_rows(member: ForeignMember) -> dict:
    """The member's outputs (by output key) on the smoke rows; refuses a member that fails."""
    import tensorflow as tf

    batch = smoke_rows([p.spec for p in member.inputs])
    try:
        return member.call({p.key: tf.constant(batch[p.spec.name]) for p in member.inputs})
    except Exception as exc:  # a member that fails on valid rows cannot be served
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise MemberImportError(f"{member.source}: fails on {_SMOKE_ROWS} generated rows of its inputs: "
                                f"{type(exc).__name__}: {first_line}") from None


def run_smoke(member: ForeignMember) -> None:
    """Run the member on the smoke rows; keep each output as (rows, k), refusing one that is not
    one finite row per input row."""
    produced = _call_on_smoke_rows(member)
    for port in member.outputs:
        values = np.asarray(produced[port.key])
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or len(values) != _SMOKE_ROWS:
            raise MemberImportError(
                f"{member.source}: output {port.name!r} has shape {list(values.shape)} for {_SMOKE_ROWS} rows; a "
                f"head gives one row of k values per input row ([{_SMOKE_ROWS}, k])")
        if not np.issubdtype(values.dtype, np.number) or not np.all(np.isfinite(values)):
            raise MemberImportError(f"{member.source}: output {port.name!r} is not finite numbers on "
                                    f"{_SMOKE_ROWS} generated rows")
        member.values[port.name] = values.astype(np.float64)


def _is_softmax_rows(values: np.ndarray) -> bool:
    return (values.shape[1] >= 2 and values.min() >= -_PROBABILITY_SLACK and values.max() <= 1 + _PROBABILITY_SLACK
            and bool(np.allclose(values.sum(axis=1), 1.0, atol=_PROBABILITY_SLACK)))


def value_problem(task: str, values: np.ndarray, variance: bool) -> str | None:
    """What is wrong with a head's smoke values (rows, width) for its task, or None."""
    width = values.shape[1]
    if variance:
        if width % 2:
            return (f"it gives {width} columns; a head with a variance gives 2k: the k means, then the k "
                    "variances")
        if values[:, width // 2:].min() < 0:
            return "its variances (the second half of its columns) are negative"
        return None
    if task == "classification" and not _is_softmax_rows(values):
        return ("its values are not probabilities (rows must be >= 0 and sum to 1): end the model with a softmax"
                if width >= 2 else "it gives 1 column; a classification head gives one per class (a softmax)")
    if task == "binary" and width not in (1, 2):
        return f"it gives {width} columns; a binary head gives 1 (a sigmoid) or 2 (a softmax)"
    if task == "binary" and width == 2 and not _is_softmax_rows(values):
        return "its 2 columns are not probabilities summing to 1 (end the model with a softmax)"
    if task in ("binary", "multilabel") and (values.min() < -_PROBABILITY_SLACK or values.max() > 1 + _PROBABILITY_SLACK):
        return (f"its values are not probabilities (they reach {values.min():.3g} to {values.max():.3g}, outside "
                "[0, 1]): end the head with a sigmoid, or say it is a regression")
    return None


# -- agreeing, tasks, labels ---------------------------------------------------------------------


def _adopt_single_names(members: list[ForeignMember], ports: str) -> None:
    """Members of one input (or one head) whose name Keras made up take the name the others gave
    it (a Sequential model beside a named Functional one)."""
    if not all(len(getattr(m, ports)) == 1 for m in members):
        return
    named = {getattr(m, ports)[0].name for m in members if not getattr(m, ports)[0].automatic}
    if len(named) == 1:
        for m in members:
            getattr(m, ports)[0].name = next(iter(named))


def check_agreement(members: list[ForeignMember]) -> None:
    """Refuse members that do not take the same inputs (names, dtypes, shapes) or give the same
    heads (names, widths), naming both files and the input or head."""
    first = members[0]
    for m in members[1:]:
        for what, mine, theirs in (("inputs", m.inputs, first.inputs), ("heads", m.outputs, first.outputs)):
            if sorted(p.name for p in mine) != sorted(p.name for p in theirs):
                raise MemberImportError(
                    f"{m.source} {'takes' if what == 'inputs' else 'gives'} {what} {sorted(p.name for p in mine)} but "
                    f"{first.source} {'takes' if what == 'inputs' else 'gives'} {sorted(p.name for p in theirs)}: "
                    "members of one ensemble must agree")
        for port in m.inputs:
            other = next(p for p in first.inputs if p.name == port.name)
            if (port.spec.dtype, port.spec.shape) != (other.spec.dtype, other.spec.shape):
                raise MemberImportError(
                    f"{m.source}: input {port.name!r} takes {_describe(port.spec)} but {first.source} takes "
                    f"{_describe(other.spec)}: members of one ensemble must agree")
        for port in m.outputs:
            mine, theirs = m.values[port.name].shape[1], first.values[port.name].shape[1]
            if mine != theirs:
                raise MemberImportError(f"{m.source}: head {port.name!r} gives {mine} columns but {first.source} "
                                        f"gives {theirs}: members of one ensemble must agree")


def _describe(spec: TensorSpec) -> str:
    return f"{spec.dtype} [{', '.join('None' if d is None else str(d) for d in spec.shape)}]"


def _for_heads(given: Mapping[str | None, object], heads: list[str], flag: str) -> dict[str, object]:
    """A per-head option by head name: None (no head named) means the only head."""
    resolved = {}
    for head, value in given.items():
        if head is None:
            if len(heads) != 1:
                raise MemberImportError(f"{flag} without a head name needs members with one head; they give heads "
                                        f"{heads}: write {flag} HEAD=...")
            head = heads[0]
        elif head not in heads:
            raise MemberImportError(f"{flag} names head {head!r}, but the members give heads {heads}")
        resolved[head] = value
    return resolved


def resolve_task(head: str, members: list[ForeignMember], given: str | None, variance: bool,
                 several: bool) -> tuple[str, str]:
    """The head's task and where it comes from: given, implied by a variance (regression), or
    what every member's end says; refuses when they disagree or none says."""
    if variance and given not in (None, "regression"):
        raise MemberImportError(f"--variance {head}: only a regression head has a variance, --task says {given}")
    if given:
        return given, "from --task"
    if variance:
        return "regression", "from --variance"
    said: dict[str, ForeignMember] = {}
    for m in members:  # each task said, with the first member that says it
        if m.port(head).task is not None:
            said.setdefault(m.port(head).task, m)
    if len(said) > 1:
        (task_a, a), (task_b, b) = list(said.items())[:2]
        raise MemberImportError(
            f"{a.source}: head {head!r} {a.port(head).says} ({task_a}) but {b.source} {b.port(head).says} "
            f"({task_b}): members must agree, or pass --task {head}=TASK")
    if said:
        task, member = next(iter(said.items()))
        return task, f"it {member.port(head).says}"
    ask = f"--task {head}=TASK" if several else "--task TASK"
    first = members[0]
    raise MemberImportError(f"{first.source}: head {head!r} {first.port(head).says}; say what it is with {ask} "
                            f"(one of {TASK_CHOICES})")


def default_labels(head: str, task: str, count: int) -> tuple[str, ...]:
    """Labels when none are given: the class or label index ("0", "1", ...; a binary head's
    negative and positive "0", "1"), a regression head's name (numbered for several targets)."""
    if task == "regression":
        return (head,) if count == 1 else tuple(f"{head}_{i}" for i in range(count))
    return tuple(str(i) for i in range(count))


def label_count(task: str, width: int, variance: bool) -> int:
    """How many labels a head of this task and width has."""
    if task == "binary":
        return 2
    return width // 2 if variance else width


# -- exporting -----------------------------------------------------------------------------------


def export_member(member: ForeignMember, export_dir: Path, input_signature: list, serve: Callable) -> None:
    """Write the member as a SavedModel whose `serve` endpoint (and `serving_default`) is `serve`
    over `input_signature`, tracking the model (a Keras model or a loaded SavedModel, its lookup
    tables included)."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(member.resource)
    archive.add_endpoint("serve", serve, input_signature=input_signature)
    try:
        archive.write_out(str(export_dir), verbose=False)
    except Exception as exc:  # TF raises many types for graphs it cannot save
        raise MemberImportError(f"{member.source}: cannot be exported: {type(exc).__name__}: {exc}") from None


def export_named(member: ForeignMember, export_dir: Path, inputs: tuple[TensorSpec, ...],
                 heads: tuple[HeadSpec, ...]) -> None:
    """Format 2: `serving_default` takes every input and gives every head by its manifest name."""
    import tensorflow as tf

    keys = {p.name: p.key for p in member.inputs}
    widths = {h.name: member.values[h.name].shape[1] for h in heads}
    ports = {h.name: member.port(h.name).key for h in heads}

    def serve(named: dict) -> dict:
        out = member.call({keys[name]: tensor for name, tensor in named.items()})
        return {head: tf.reshape(out[ports[head]], [-1, widths[head]]) for head in ports}

    specs = {s.name: tf.TensorSpec([None, *s.shape], tf.as_dtype(s.dtype), name=s.name) for s in inputs}
    export_member(member, export_dir, [specs], serve)


def export_single(member: ForeignMember, export_dir: Path, spec: InputSpec) -> None:
    """Format 1: a `serve` endpoint taking one tensor, `instances`, and giving the one head."""
    import tensorflow as tf

    key, out = member.inputs[0].key, member.outputs[0].key
    export_member(member, export_dir, [tf.TensorSpec([None, *spec.shape], tf.as_dtype(spec.dtype), name="instances")],
                  lambda x: member.call({key: x})[out])


# -- the whole import ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportPlan:
    """What the members agree on: the inputs, the heads with their tasks and labels, and whether
    it fits format 1 (one fixed numeric input, one classification head, no named dict input)."""

    inputs: tuple[TensorSpec, ...]
    heads: tuple[HeadSpec, ...]
    single: bool
    origins: dict[str, str]  # head name -> what says its task: a flag, or the members' end


def plan_import(members: list[ForeignMember], tasks: Mapping[str | None, str], labels: Mapping[str | None, list[str]],
                variances: set[str], labels_flag: str = "--labels") -> ImportPlan:
    """Agree the members' inputs and heads, settle each head's task and labels, and check every
    member's values fit their head's task."""
    _adopt_single_names(members, "inputs")
    _adopt_single_names(members, "outputs")
    check_agreement(members)
    first = members[0]
    names = [p.name for p in first.outputs]
    tasks = _for_heads(tasks, names, "--task")
    labels = _for_heads(labels, names, labels_flag)
    _for_heads(dict.fromkeys(variances), names, "--variance")
    for m in members:  # a SavedModel's rows that are probabilities say classification
        for port in m.outputs:
            if port.task is None and port.reads_values and _is_softmax_rows(m.values[port.name]):
                port.task, port.says = "classification", "gives rows of probabilities that sum to one"
    heads, origins = [], {}
    for head in names:
        variance = head in variances
        task, origins[head] = resolve_task(head, members, tasks.get(head), variance, len(names) > 1)
        for m in members:
            problem = value_problem(task, m.values[head], variance)
            if problem:
                raise MemberImportError(f"{m.source}: head {head!r} ({task}{', with a variance' if variance else ''}): "
                                        f"{problem}")
        width = first.values[head].shape[1]
        count = label_count(task, width, variance)
        given = labels.get(head)
        if given is not None and len(given) != count:
            which = f" for head {head!r}" if len(names) > 1 else ""
            raise MemberImportError(f"{labels_flag} names {len(given)} labels{which} but the members output {count}"
                                    + (" (a binary head has two labels: negative, positive)" if task == "binary" else ""))
        try:
            heads.append(HeadSpec(name=head, task=task, labels=tuple(given or default_labels(head, task, count)),
                                  variance=variance))
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise MemberImportError(f"{first.source}: " + (problem if problem.startswith("head ") else
                                                           f"head {head!r}: {problem}")) from None
    inputs = tuple(p.spec for p in first.inputs)
    only = inputs[0]
    single = (len(inputs) == 1 and len(heads) == 1 and not any(m.dict_inputs for m in members)
              and only.dtype in SUPPORTED_DTYPES and bool(only.shape) and only.fixed
              and heads[0].task == "classification" and not heads[0].variance)
    return ImportPlan(inputs, tuple(heads), single, origins)


def _columns(member: ForeignMember, head: str) -> str:
    width = member.values[head].shape[1]
    return f"{width} column{'s' if width != 1 else ''}"


def _report_line(member: ForeignMember, plan: ImportPlan) -> str:
    if plan.single:
        spec = plan.inputs[0]
        return f"[import] {member.source}: input {list(spec.shape)} {spec.dtype}, {len(plan.heads[0].labels)} classes"
    inputs = ", ".join(f"{s.name} {_describe(s)}" for s in plan.inputs)
    heads = ", ".join(f"{h.name} ({h.task}{' with a variance' if h.variance else ''}: {plan.origins[h.name]}; "
                      f"{_columns(member, h.name)})" for h in plan.heads)
    return f"[import] {member.source}: inputs {inputs}; heads {heads}"


def import_members(
    repository: Path | RemoteStore, name: str, sources: list[Path], classes: list[str] | None = None,
    report: Callable[[str], None] = print, *, tasks: Mapping[str | None, str] | None = None,
    labels: Mapping[str | None, list[str]] | None = None, variances: set[str] | frozenset[str] = frozenset(),
) -> Manifest | ManifestV2:
    """Check, re-export and publish foreign members as a new version of `name`: format 1 for one
    input and one classification head, format 2 otherwise. `tasks` and `labels` are by head name
    (None: the only head); `classes` is the only head's labels; `variances` names the regression
    heads whose second half of columns are variances."""
    if not sources:
        raise MemberImportError("give at least one SavedModel folder or .keras file")
    labels, flag = ({None: classes}, "--classes") if classes is not None else (dict(labels or {}), "--labels")
    members = [read_member(Path(source)) for source in sources]
    for member in members:
        run_smoke(member)
    plan = plan_import(members, tasks or {}, labels, set(variances), flag)
    work = Path(tempfile.mkdtemp(prefix="import-"))
    try:
        artifacts = []
        for i, (member, weight) in enumerate(zip(members, uniform_weights(len(members)))):
            report(_report_line(member, plan))
            folder = work / f"imported-{i}"
            if plan.single:
                export_single(member, folder, InputSpec(shape=plan.inputs[0].shape, dtype=plan.inputs[0].dtype))
            else:
                export_named(member, folder, plan.inputs, plan.heads)
            artifacts.append(MemberArtifact(name=f"imported-{i}", kind="imported", source=folder, weight=weight,
                                            hyperparameters={"source": str(member.source)}))
        if plan.single:
            manifest = publish_version(repository, name, artifacts,
                                       InputSpec(shape=plan.inputs[0].shape, dtype=plan.inputs[0].dtype),
                                       OutputSpec(classes=plan.heads[0].labels), {})
        else:
            manifest = publish_named_version(repository, name, artifacts, plan.inputs, plan.heads, {})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    form = "format 1" if plan.single else "format 2: " + ", ".join(f"{h.name} {h.task}" for h in plan.heads)
    report(f"[publish] {name} version {manifest.version} with {len(manifest.members)} imported members ({form})")
    return manifest
