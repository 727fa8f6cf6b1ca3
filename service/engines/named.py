"""The engine of format-2 versions (named inputs, heads with tasks): every member's
`serving_default` signature, called on the request's named inputs inside one `tf.function`, its
outputs stacked per head. The heads' combination rules run after it, in NumPy
(contract.tasks, through service.answer), so one graph serves every task and every input kind.
Compiling a version (`compile_named`, in the compile child like a format-1 version's) loads,
checks and warms it, and converts that function to TensorFlow Lite, kept when it converts
(numbers in, TensorFlow Lite's own ops) and answers what the members answer: the server then
runs it there (service.engines.lite) without restoring a SavedModel. Strings and lookup tables
(TextVectorization, StringLookup) do not convert: such a version is loaded here in the server
(`load_named`), after the child has shown it loads. The loader (service.engines.loader) logs which
engine serves and why.

A member's signature must take every input of the manifest by name, with a compatible dtype and
shape, and give every head by name (a member with one output may give the only head under any
name); a regression head with a variance gives 2k columns, the k means then the k variances.
What the engine returns, per head in the manifest's order: the members' values (rows, members,
k), then for a head with a variance the members' variances (rows, members, k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from contract.manifest import HeadSpec, ManifestV2
from service.engines.base import Ensemble, LoadError, no_pause, warm_up_named, warmup_inputs
from service.engines.compiled import NamedCompiled

# TensorFlow Lite's outputs and TensorFlow's must agree to this (float32; fused kernels reorder sums).
FAITHFUL_ATOL = 1e-5
FAITHFUL_ROWS = 32


class SignatureError(LoadError):
    """A member's serving signature does not take the manifest's inputs or give its heads."""

    category = "signature"


def head_widths(head: HeadSpec) -> tuple[int, ...]:
    """The columns a member may give for the head: its columns (contract.manifest.HeadSpec),
    twice that for a regression head with a variance, and for a binary head also two softmax
    columns (the second is the positive label's)."""
    if head.variance:
        return (2 * head.columns,)
    return (1, 2) if head.task == "binary" else (head.columns,)


def check_member(member: str, inputs: dict[str, tf.TensorSpec], outputs: dict[str, tf.TensorSpec],
                 manifest: ManifestV2) -> dict[str, str]:
    """Raise SignatureError naming the member, input or head and why, unless the signature takes
    every manifest input and gives every head; returns head name -> the member's output name."""
    missing = [spec.name for spec in manifest.inputs if spec.name not in inputs]
    extra = sorted(set(inputs) - {spec.name for spec in manifest.inputs})
    if missing or extra:
        raise SignatureError(f"member {member}: its signature takes inputs {sorted(inputs)}; the manifest "
                             f"names {[s.name for s in manifest.inputs]}")
    for spec in manifest.inputs:
        got, want = inputs[spec.name], tf.TensorSpec([None, *spec.shape], tf.as_dtype(spec.dtype))
        if got.dtype != want.dtype:
            raise SignatureError(f"member {member}: input {spec.name!r} takes {got.dtype.name}, the manifest "
                                 f"says {spec.dtype}")
        if not got.shape.is_compatible_with(want.shape):
            raise SignatureError(f"member {member}: input {spec.name!r} takes shape {got.shape.as_list()[1:]}, "
                                 f"the manifest says {list(spec.shape)}")
    names = {}
    for head in manifest.heads:
        name = head.name if head.name in outputs else (next(iter(outputs)) if len(outputs) == len(manifest.heads) == 1
                                                       else None)
        if name is None:
            raise SignatureError(f"member {member}: gives no output {head.name!r} (it gives {sorted(outputs)})")
        shape = outputs[name].shape
        if shape.rank != 2 or shape[1] not in (None, *head_widths(head)):  # None: refused below
            raise SignatureError(f"member {member}: output {name!r} has shape {shape.as_list()[1:]}; head "
                                 f"{head.name!r} needs {' or '.join(f'[{w}]' for w in head_widths(head))}")
        if shape[1] is None:
            raise SignatureError(f"member {member}: output {name!r} does not say its width; head {head.name!r} "
                                 f"needs {' or '.join(f'[{w}]' for w in head_widths(head))}")
        names[head.name] = name
    return names


class NamedEngine:
    """Named inputs (a dict of arrays) -> per head the members' stacked outputs, by one
    `tf.function` over every member's signature, traced once (its input signature leaves the
    batch and every variable dimension open) and called as its concrete function: the
    `tf.function`'s own dispatch (matching the call against its traces) costs about as much as
    a small ensemble's computation."""

    kind = "tensorflow"

    def __init__(self, function: Callable, names: tuple[str, ...], owner: object):
        self.function, self._names, self.owner = function, names, owner  # owner: keeps the members alive

    def run(self, x: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        outputs = self.function({name: tf.constant(x[name]) for name in self._names})
        return tuple(o.numpy() for o in outputs)


def load_named(manifest: ManifestV2, version_dir: Path, warmup_sizes: Sequence[int],
               pace: Callable[[], None] = no_pause) -> Ensemble:
    """Load every member's signature, check it, build the stacked function and warm it up: the
    version on TensorFlow."""
    members, maps = [], []
    for member in manifest.members:
        try:
            loaded = tf.saved_model.load(str(version_dir / member.path))
            signature = loaded.signatures["serving_default"]
        except KeyError:
            raise SignatureError(f"member {member.name}: its SavedModel has no serving_default signature") from None
        except Exception as exc:  # TF raises many types for unreadable SavedModels
            raise LoadError(f"member {member.name}: cannot load SavedModel: {exc}") from None
        maps.append(check_member(member.name, signature.structured_input_signature[1],
                                 signature.structured_outputs, manifest))
        members.append((loaded, signature))
        pace()
    heads = manifest.heads

    signature = {spec.name: tf.TensorSpec([None, *spec.shape], tf.as_dtype(spec.dtype), name=spec.name)
                 for spec in manifest.inputs}

    @tf.function(input_signature=[signature])  # every length of a variable dimension: traced once
    def stacked(inputs):
        outs = [member_signature(**inputs) for _, member_signature in members]
        result = []
        for head in heads:
            # a binary member with two softmax columns gives the positive label's second
            values = tf.stack([tf.cast(out[names[head.name]], tf.float32)[:, -head.columns * (2 if head.variance else 1):]
                               for out, names in zip(outs, maps)], axis=1)
            if head.variance:
                result += [values[:, :, :head.columns], values[:, :, head.columns:]]
            else:
                result.append(values)
        return result

    function = stacked.get_concrete_function()
    names = tuple(spec.name for spec in manifest.inputs)
    return warm_up_named(Ensemble(manifest, version_dir, NamedEngine(function, names, owner=members)),
                         warmup_sizes, pace)


def compile_named(manifest: ManifestV2, version_dir: Path, pace: Callable[[], None] = no_pause) -> NamedCompiled:
    """A format-2 version loaded, checked and warmed on TensorFlow (LoadError, with its category,
    if it cannot be), then converted to TensorFlow Lite: the model when it converts and answers
    the same, else why not. Run in the compile child, as a format-1 version's compilation is."""
    ensemble = load_named(manifest, version_dir, (1, FAITHFUL_ROWS), pace)
    engine = ensemble.engine
    try:
        lite = converted(ensemble, engine.function, engine.owner)
    except LoadError as exc:  # WarmupError included
        return NamedCompiled(None, str(exc))
    return NamedCompiled(lite.engine.model)


def converted(ensemble: Ensemble, function, owner: object, threads: int = 1, pool: int = 1) -> Ensemble:
    """The version on TensorFlow Lite: its stacked function converted, and checked to answer
    what it answers on TensorFlow (every output, FAITHFUL_ROWS rows); LoadError saying why not."""
    from service.engines.compile import to_lite
    from service.engines.lite import NamedLiteEngine

    manifest = ensemble.manifest
    x = warmup_inputs(manifest.inputs, FAITHFUL_ROWS)
    want = ensemble.engine.run(x)
    names = tuple(spec.name for spec in manifest.inputs)
    lite = Ensemble(manifest, ensemble.path, NamedLiteEngine(to_lite(function, owner), names, len(want), threads, pool))
    for i, (a, b) in enumerate(zip(want, lite.engine.run(x))):
        worst = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
        if not worst <= FAITHFUL_ATOL:
            raise LoadError(f"its TensorFlow Lite model's output {i} differs from the members' by {worst:.2g}")
    return lite


