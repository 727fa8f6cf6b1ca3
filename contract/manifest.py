"""The manifest: the contract of one published version, its schema and how it is read.

Shared by the writer (training) and the reader (service), like the rest of `contract`; it imports
neither TensorFlow nor FastAPI, so both halves (and their tests) can use it cheaply. A version's
manifest names its input, its output's classes, its members with their weights, kinds and file
digests, and what the trainer fitted (calibration, abstention, the uncertainty reference).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from contract.layout import MANIFEST_FILE, MEMBERS_DIR, NAME_PATTERN

FORMAT_VERSION = 1  # what the trainer writes for one input and one classification output
FORMATS = (1, 2)  # what is read: format 2 has named inputs and heads with tasks
MEMBER_KINDS = ("tuned", "seed", "snapshot", "swa", "imported")
SUPPORTED_DTYPES = ("float32", "float64", "int32", "int64", "uint8")
# Weights must sum to one; this absorbs rounding in a JSON round trip.
WEIGHT_SUM_TOLERANCE = 1e-6


class RepositoryError(Exception):
    """A version on disk is not a valid, complete version."""

    category = "invalid"  # the reason label of the reload-failure metric


def failure_of(exc: Exception) -> tuple[str, str]:
    """(reason, category) of why a version could not be loaded: a RepositoryError says both;
    anything else (TensorFlow and Keras raise many types for unloadable models) is a `load`
    failure named by its type."""
    if isinstance(exc, RepositoryError):
        return str(exc), exc.category
    return f"{type(exc).__name__}: {exc}", "load"


class ManifestError(RepositoryError):
    """The manifest is missing, unreadable or does not follow the schema."""

    category = "manifest"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """Shape of one instance (without the batch dimension) and its dtype."""

    shape: tuple[int, ...] = Field(min_length=1)
    dtype: Literal["float32", "float64", "int32", "int64", "uint8"] = "float32"

    @field_validator("shape")
    @classmethod
    def _positive_dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d <= 0 for d in shape):
            raise ValueError(f"every dimension must be a positive integer, got {list(shape)}")
        return shape


class OutputSpec(_Strict):
    """The class labels, in the order of the probability columns."""

    classes: tuple[str, ...] = Field(min_length=2)

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(classes)) != len(classes):
            raise ValueError("class labels must be unique")
        return classes


class MemberEntry(_Strict):
    """One ensemble member: where it is, how it was made, how it did, and its files' digests."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str
    kind: Literal["tuned", "seed", "snapshot", "swa", "imported"]
    hyperparameters: dict[str, bool | int | float | str | None] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    weight: float = Field(gt=0.0, le=1.0)
    files: dict[str, str] = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _inside_members(cls, path: str) -> str:
        parts = PurePosixPath(path).parts
        if len(parts) != 2 or parts[0] != MEMBERS_DIR or parts[1] in ("..", "."):
            raise ValueError(f"member path must be '{MEMBERS_DIR}/<member>', got {path!r}")
        return path

    @field_validator("files")
    @classmethod
    def _relative_files_and_digests(cls, files: dict[str, str]) -> dict[str, str]:
        for rel, digest in files.items():
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or rel != p.as_posix():
                raise ValueError(f"file path {rel!r} must be relative, normalised, inside the member")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"digest of {rel!r} is not a sha256 hex digest")
        return files


class DataInfo(_Strict):
    """Where the training data came from, and a fingerprint of its contents."""

    source: str
    fingerprint: str
    rows: dict[str, int] = Field(default_factory=dict)


# The uncertainty scores of a prediction (contract.scores computes them).
ScoreName = Literal["entropy", "expected_entropy", "mutual_information"]


class Calibration(_Strict):
    """Pool, then calibrate: the temperature applied to the averaged members (contract.scores)."""

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0.0, le=100.0)


class Abstention(_Strict):
    """When a prediction should not be trusted: a row whose `score` (contract.scores.SCORES) is
    above `threshold` is flagged `abstain`. Fitted on the validation split so that the answered
    rows err at most `target_error`; `coverage` is the share it answered there."""

    score: ScoreName
    threshold: float
    target_error: float = Field(gt=0.0, lt=1.0)
    coverage: float = Field(ge=0.0, le=1.0)


class _Version(_Strict):
    """The rules every format's manifest follows: its members' names, paths and weights. Each
    format declares its fields itself (`members` among them), in the order its files list them."""

    @model_validator(mode="after")
    def _members_consistent(self):
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        paths = [m.path for m in self.members]
        if len(set(paths)) != len(paths):
            raise ValueError(f"member paths must be unique, got {paths}")
        total = sum(m.weight for m in self.members)
        if not math.isclose(total, 1.0, abs_tol=WEIGHT_SUM_TOLERANCE):
            raise ValueError(f"member weights must sum to 1, they sum to {total}")
        return self

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.members)


class Manifest(_Version):
    """The contract of one published version in format 1: one input tensor, one classification
    output. Written last; its presence commits the version."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    created: datetime
    input: InputSpec
    output: OutputSpec
    members: tuple[MemberEntry, ...] = Field(min_length=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    data: DataInfo | None = None
    replaces: int | None = None
    calibration: Calibration | None = None
    abstention: Abstention | None = None
    # Mean of each uncertainty score on the validation split: the level a drift alert compares with.
    uncertainty_reference: dict[ScoreName, float] = Field(default_factory=dict)

    @property
    def temperature(self) -> float:
        """The temperature of the pooled distribution (1: not calibrated)."""
        return self.calibration.temperature if self.calibration is not None else 1.0

    def signature(self) -> "Signature":
        """The version's inputs and heads as format 2 names them: one input, `instances`; one
        classification head, `probabilities`."""
        head = HeadSpec(name="probabilities", task="classification", labels=self.output.classes,
                        temperatures=(self.temperature,),
                        abstention=(HeadAbstention(score=self.abstention.score, threshold=self.abstention.threshold)
                                    if self.abstention is not None else None),
                        uncertainty_reference=dict(self.uncertainty_reference))
        return Signature(inputs=(TensorSpec(name="instances", dtype=self.input.dtype, shape=self.input.shape),),
                         heads=(head,))


# -- format 2: named inputs, heads with tasks ----------------------------------------------------

TASKS = ("classification", "binary", "multilabel", "regression")  # contract.tasks holds their rules
# The uncertainty scores of each task's rows (contract.tasks computes them, in this order).
TASK_SCORES = {"classification": ("entropy", "expected_entropy", "mutual_information"),
               "binary": ("entropy", "expected_entropy", "mutual_information"),
               "multilabel": ("entropy", "expected_entropy", "mutual_information"),
               "regression": ("std", "epistemic_std", "aleatoric_std")}
VALUE_DTYPES = ("float32", "float64", "int32", "int64", "uint8", "bool", "string")
TENSOR_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"
NULLABLE_DTYPES = ("float32", "float64", "string")  # the dtypes that have a missing value: NaN, ""


class TensorSpec(_Strict):
    """One named input: its dtype and its shape after the batch dimension, a dimension of None
    taking any length (text's tokens); () is one value per row (a string, a number). `nullable`:
    the members take a missing value in this input (NaN in a float input, the empty string in a
    string input), which a request may send as null; without it a missing value is refused."""

    name: str = Field(pattern=TENSOR_NAME)
    dtype: Literal["float32", "float64", "int32", "int64", "uint8", "bool", "string"]
    shape: tuple[int | None, ...] = ()
    nullable: bool = False

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        if any(d is not None and d <= 0 for d in shape):
            raise ValueError(f"every dimension must be a positive integer or null (any length), got {list(shape)}")
        return shape

    @model_validator(mode="after")
    def _nullable_has_a_missing_value(self) -> "TensorSpec":
        if self.nullable and self.dtype not in NULLABLE_DTYPES:
            raise ValueError(f"input {self.name!r} ({self.dtype}) cannot be nullable: only a float input (missing: "
                             "NaN) or a string input (missing: the empty string) can")
        return self

    @model_serializer(mode="wrap")
    def _nullable_only_when_true(self, serialize):
        # A manifest written without the field reads, digests and is written again byte for byte
        # as before it existed (the compile cache's key is a digest of the serialised manifest).
        data = serialize(self)
        if not self.nullable:
            data.pop("nullable", None)
        return data

    @property
    def fixed(self) -> bool:
        """Whether every dimension has a length."""
        return all(d is not None for d in self.shape)


class HeadAbstention(_Strict):
    """When a head's row is not to be trusted: its `score` (one of the task's, or
    `interval_width` of a regression head at `level`) above `threshold`."""

    score: str
    threshold: float
    level: float | None = Field(default=None, gt=0.0, lt=1.0)


class HeadSpec(_Strict):
    """One named output and its task (contract.tasks): `labels` names its k columns (the classes;
    a binary head's negative then positive label; a multi-label head's labels; a regression
    head's targets). Calibration: `temperatures` (one for classification and binary, one per
    label for multilabel; none: not calibrated), `variance_scale` (regression). `variance`: the
    members' regression head also gives a variance (a Gaussian head)."""

    name: str = Field(pattern=TENSOR_NAME)
    task: Literal["classification", "binary", "multilabel", "regression"]
    labels: tuple[str, ...] = Field(min_length=1)
    variance: bool = False
    temperatures: tuple[float, ...] = ()
    variance_scale: float = Field(default=1.0, gt=0.0)
    abstention: HeadAbstention | None = None
    uncertainty_reference: dict[str, float] = Field(default_factory=dict)

    @property
    def columns(self) -> int:
        """The columns of the head's value: one for binary (the positive label's probability),
        else one per label."""
        return 1 if self.task == "binary" else len(self.labels)

    @model_validator(mode="after")
    def _fits_its_task(self) -> "HeadSpec":
        k, task = len(self.labels), self.task
        if len(set(self.labels)) != k:
            raise ValueError(f"head {self.name!r}: labels must be unique")
        if task == "classification" and k < 2:
            raise ValueError(f"head {self.name!r}: a classification head needs at least two classes")
        if task == "binary" and k != 2:
            raise ValueError(f"head {self.name!r}: a binary head has two labels (negative, positive), got {k}")
        if self.variance and task != "regression":
            raise ValueError(f"head {self.name!r}: only a regression head has a variance")
        want = {"classification": 1, "binary": 1, "multilabel": k}.get(task, 0)
        if self.temperatures and len(self.temperatures) != want:
            raise ValueError(f"head {self.name!r}: a {task} head has {want} temperature(s), got "
                             f"{len(self.temperatures)}")
        if any(not 0.0 < t <= 100.0 for t in self.temperatures):
            raise ValueError(f"head {self.name!r}: temperatures must be in (0, 100]")
        scores = TASK_SCORES[task] + (("interval_width",) if task == "regression" else ())
        if self.abstention is not None and self.abstention.score not in scores:
            raise ValueError(f"head {self.name!r}: a {task} head abstains on one of {', '.join(scores)}")
        if self.abstention is not None and (self.abstention.score == "interval_width") != (self.abstention.level is not None):
            raise ValueError(f"head {self.name!r}: an interval_width abstention, and only it, names its level")
        return self


class Signature(_Strict):
    """What a version takes and answers: its named inputs and its heads."""

    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    heads: tuple[HeadSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Signature":
        for what, names in (("input", [i.name for i in self.inputs]), ("head", [h.name for h in self.heads])):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        return self


class ManifestV2(_Version):
    """The contract of one published version in format 2: named inputs of any dtype and shape,
    and heads with tasks, each with its own calibration and abstention."""

    format_version: Literal[2]
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    created: datetime
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    heads: tuple[HeadSpec, ...] = Field(min_length=1)
    members: tuple[MemberEntry, ...] = Field(min_length=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    data: DataInfo | None = None
    replaces: int | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> "ManifestV2":
        self.signature()
        return self

    def signature(self) -> Signature:
        return Signature(inputs=self.inputs, heads=self.heads)


def first_nonfinite_row(x: np.ndarray) -> int | None:
    """Index of the first row holding NaN or infinity, or None if every value is finite: rows a
    version is trained on or asked about must be finite."""
    if x.dtype.kind != "f":
        return None
    # For float32 and narrower, one float64 sum decides: NaN and infinity reach it, and finite
    # values cannot overflow it. A float64 sum could overflow, so float64 is checked value by value.
    if x.dtype.itemsize < 8 and np.isfinite(np.add.reduce(x, axis=None, dtype=np.float64)):
        return None
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def uniform_weights(n: int) -> list[float]:
    """Equal averaging weights for n members that sum to exactly one after rounding."""
    if n < 1:
        raise ValueError("an ensemble needs at least one member")
    return [1.0 / n] * n


def manifest_format(raw: bytes) -> int:
    """The format a manifest's bytes declare (1 when they declare none, as format 1 may)."""
    try:
        declared = json.loads(raw).get("format_version", 1)
    except (ValueError, AttributeError, RecursionError):
        return 1  # not a JSON object: the format-1 schema's validation says what is wrong
    return declared if declared in FORMATS else 1


def read_manifest(version_dir: Path) -> Manifest | ManifestV2:
    """Parse and validate a version's manifest, in the format it declares, checking it names the
    folder it sits in."""
    path = version_dir / MANIFEST_FILE
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ManifestError(f"{path} is not a regular file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist (the version is not committed)") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    try:
        manifest = (ManifestV2 if manifest_format(raw) == 2 else Manifest).model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ManifestError(f"{path} does not follow the schema: {problems}") from None
    if manifest.name != version_dir.parent.name or str(manifest.version) != version_dir.name:
        raise ManifestError(
            f"{path} describes {manifest.name}/{manifest.version} but sits in "
            f"{version_dir.parent.name}/{version_dir.name}"
        )
    return manifest
