"""Bring your own members: publish SavedModels or `.keras` files made elsewhere as a version.

Every member is re-exported in this repository's shape (one `serve` endpoint and a
`serving_default` signature taking one tensor and returning one probability row per input),
so the service treats imported members exactly like trained ones. The input spec is read from
the members' signatures and must agree across them; the outputs are smoke-tested to be
probabilities before anything is published.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from contract.manifest import SUPPORTED_DTYPES, InputSpec, Manifest, OutputSpec, uniform_weights
from training.publish import MemberArtifact, PublishError, publish_version

_SMOKE_ROWS = 4


class MemberImportError(PublishError):
    """A member cannot be imported; the message names it and says why."""


@dataclass(frozen=True)
class ImportedMember:
    source: Path
    export_dir: Path
    spec: InputSpec
    classes: int


def _signature_of(loaded, source: Path):
    """The single-input, single-output serving function of a SavedModel and its input spec."""

    if hasattr(loaded, "serve") and getattr(loaded.serve, "input_signature", None):
        fn, signature = loaded.serve, loaded.serve.input_signature
        if len(signature) != 1:
            raise MemberImportError(f"{source}: its serve endpoint takes {len(signature)} inputs; only one is supported")
        return (lambda x: fn(x)), signature[0]
    if "serving_default" in getattr(loaded, "signatures", {}):
        fn = loaded.signatures["serving_default"]
        inputs = fn.structured_input_signature[1]
        outputs = fn.structured_outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise MemberImportError(f"{source}: serving_default has {len(inputs)} inputs and {len(outputs)} outputs; "
                               "only one of each is supported")
        (in_name, spec), (out_name,) = next(iter(inputs.items())), list(outputs)
        return (lambda x: fn(**{in_name: x})[out_name]), spec
    raise MemberImportError(f"{source}: no 'serve' endpoint and no 'serving_default' signature")


def export_foreign(source: Path, export_dir: Path) -> ImportedMember:
    """Re-export one SavedModel folder or `.keras` file with the standard `serve` endpoint."""
    import keras
    import tensorflow as tf

    if source.suffix == ".keras":
        from training.members import export_member

        try:
            # safe_mode=True, said rather than relied on: a .keras file's config may not name
            # arbitrary Python (lambdas, unknown modules) to run while loading.
            model = keras.models.load_model(str(source), compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types for unreadable files
            raise MemberImportError(f"{source}: cannot load the .keras file: {exc}") from None
        export_member(model, export_dir)
        source_for_signature = export_dir
    elif source.is_dir():
        source_for_signature = source
    else:
        raise MemberImportError(f"{source}: not a SavedModel folder or a .keras file")
    try:
        loaded = tf.saved_model.load(str(source_for_signature))
    except Exception as exc:
        raise MemberImportError(f"{source}: cannot load SavedModel: {exc}") from None
    call, spec = _signature_of(loaded, source)
    shape = spec.shape.as_list()[1:]
    if spec.shape.rank is None or any(d is None for d in shape) or not shape:
        raise MemberImportError(f"{source}: input shape {spec.shape} must be fixed apart from the batch dimension")
    dtype = spec.dtype.name
    if dtype not in SUPPORTED_DTYPES:
        raise MemberImportError(f"{source}: input dtype {dtype} is not supported")

    if source_for_signature is source:
        module = tf.Module()
        module.loaded = loaded  # tracked, so the variables are written out
        module.serve = tf.function(lambda x: call(x), input_signature=[
            tf.TensorSpec([None, *shape], spec.dtype, name="instances")])
        tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.serve})
    probs = np.asarray(call(tf.zeros([_SMOKE_ROWS, *shape], spec.dtype)))
    if probs.ndim != 2 or len(probs) != _SMOKE_ROWS:
        raise MemberImportError(f"{source}: returns shape {list(probs.shape)}; expected one probability row per input")
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3) or probs.min() < 0:
        raise MemberImportError(f"{source}: outputs are not probabilities (rows must be >= 0 and sum to 1); "
                           "end the model with a softmax")
    return ImportedMember(source, export_dir, InputSpec(shape=tuple(shape), dtype=dtype), probs.shape[1])


def import_members(
    repository: Path, name: str, sources: list[Path], classes: list[str] | None = None,
    report: Callable[[str], None] = print,
) -> Manifest:
    """Check, re-export and publish foreign members as a new version of `name`."""
    if not sources:
        raise MemberImportError("give at least one SavedModel folder or .keras file")
    work = Path(tempfile.mkdtemp(prefix="import-"))
    try:
        members = []
        for i, source in enumerate(sources):
            member = export_foreign(Path(source), work / f"imported-{i}")
            report(f"[import] {source}: input {list(member.spec.shape)} {member.spec.dtype}, "
                   f"{member.classes} classes")
            members.append(member)
        first = members[0]
        for m in members[1:]:
            if m.spec != first.spec or m.classes != first.classes:
                raise MemberImportError(
                    f"{m.source} takes {list(m.spec.shape)} {m.spec.dtype} -> {m.classes} classes but "
                    f"{first.source} takes {list(first.spec.shape)} {first.spec.dtype} -> {first.classes}: "
                    "members of one ensemble must agree")
        labels = classes or [str(i) for i in range(first.classes)]
        if len(labels) != first.classes:
            raise MemberImportError(f"--classes names {len(labels)} labels but the members output {first.classes}")
        weights = uniform_weights(len(members))
        manifest = publish_version(
            repository, name,
            [MemberArtifact(name=f"imported-{i}", kind="imported", source=m.export_dir, weight=w,
                            hyperparameters={"source": str(m.source)})
             for i, (m, w) in enumerate(zip(members, weights))],
            first.spec, OutputSpec(classes=tuple(labels)), {})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(f"[publish] {name} version {manifest.version} with {len(manifest.members)} imported members")
    return manifest
