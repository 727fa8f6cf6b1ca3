"""Data sources behind one interface, deterministic splits and a fingerprint of the data.

Sources return raw values exactly as a client would send them: the digits come as 8x8x1
images of 0..16, an `.npz` file as whatever `x` holds. Scaling is a layer inside the model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from contract.manifest import first_nonfinite_row


class DataError(Exception):
    """The data cannot be used for training; the message says what to change."""


@dataclass(frozen=True)
class Dataset:
    """Features, integer labels 0..K-1, and the label names in column order."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


@dataclass(frozen=True)
class Examples:
    """What Keras fits on: the inputs (one array, or named columns) and the targets as the
    model's loss takes them."""

    x: np.ndarray | dict[str, np.ndarray]
    y: np.ndarray


@dataclass(frozen=True)
class FitSplits:
    """The training and validation examples of a table, as the search and the members fit them
    (`Splits` serves arrays the same way)."""

    train: Examples
    val: Examples


class DataSource(Protocol):
    """Anything that can produce a Dataset."""

    def load(self) -> Dataset: ...


class DigitsSource:
    """scikit-learn's digits: 1,797 images of 8x8 pixels, values 0..16, ten classes. No download."""

    def load(self) -> Dataset:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = bunch.images.astype("float32")[..., None]
        y = bunch.target.astype("int64")
        return validate(Dataset(x, y, tuple(str(c) for c in bunch.target_names), "digits"))


class NpzSource:
    """An `.npz` file with arrays `x` (rows first), `y` (labels), and optionally `classes`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> Dataset:
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            raise DataError(f"data file {self.path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path} is not a readable .npz file: {exc}") from None
        for key in ("x", "y"):
            if key not in arrays:
                raise DataError(
                    f"{self.path} has no array {key!r} (found {sorted(arrays)}); "
                    "save it with np.savez(path, x=features, y=labels)"
                )
        x, y = arrays["x"], arrays["y"]
        if x.dtype.kind not in "iuf":
            raise DataError(f"{self.path}: x must be numeric, got dtype {x.dtype}")
        if x.ndim < 2:
            raise DataError(f"{self.path}: x must have one row per example, got shape {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{self.path}: y must be one label per row, got shape {y.shape}")
        if "classes" in arrays:
            classes = tuple(str(c) for c in arrays["classes"])
            if y.dtype.kind not in "iu":
                raise DataError(f"{self.path}: with `classes`, y must hold integer indices")
            if len(y) and (y.min() < 0 or y.max() >= len(classes)):
                raise DataError(
                    f"{self.path}: y holds indices outside 0..{len(classes) - 1} of `classes`"
                )
            labels = y.astype("int64")
        else:
            values, labels = np.unique(y, return_inverse=True)
            classes = tuple(str(v) for v in values)
        return validate(Dataset(x.astype("float32"), labels.astype("int64"), classes, str(self.path)))


TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
# The files `keras.utils.image_dataset_from_directory` reads; a folder holding any is of images.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class DataOptions:
    """Source-specific options: a table's label column(s), task and column kinds; the size and
    colour of folder images; whether a folder of texts skips the files it cannot read."""

    label_column: str = "label"
    image_size: tuple[int, int] = (32, 32)
    color_mode: str = "rgb"
    task: str | None = None  # None: inferred from the labels (training.tables)
    delimiter: str | None = None  # None: sniffed
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    skip_unreadable: bool = False

    @property
    def label_columns(self) -> tuple[str, ...]:
        """`--label-column` names one column, or several separated by commas (multi-label,
        several regression targets)."""
        return tuple(c.strip() for c in self.label_column.split(",") if c.strip())


def is_table(spec: str) -> bool:
    """Whether a `--data` argument names a table file (CSV or Parquet) or a folder of texts (a
    table of one text column): trained with named columns, in manifest format 2."""
    return spec.lower().endswith(TABLE_SUFFIXES) or is_text_folder(spec)


def is_text_folder(spec: str) -> bool:
    """Whether a `--data` argument names a folder whose class sub-folders hold `.txt` files and no
    images (a folder with any image is one of images, as it always was)."""
    folder = Path(spec)
    if spec == "digits" or not folder.is_dir():
        return False
    texts = False
    try:
        for sub in folder.iterdir():
            # Hidden folders (.ipynb_checkpoints, .git) are no classes; training.text_folder skips them too.
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            for _, folders, files in os.walk(sub):
                # Hidden at any depth (Jupyter's checkpoint copies) too, as training.text_folder.
                folders[:] = [f for f in folders if not f.startswith(".")]
                for file in files:
                    if file.startswith("."):
                        continue
                    suffix = os.path.splitext(file)[1].lower()
                    if suffix in IMAGE_SUFFIXES:
                        return False
                    texts = texts or suffix == ".txt"
    except OSError:
        return False  # unreadable: the image reader says why
    return texts


class ImageFolderSource:
    """Images in one sub-folder per class (`keras.utils.image_dataset_from_directory`), resized
    to a fixed size; pixel values stay 0..255, as a client would send them."""

    def __init__(self, path: Path, image_size: tuple[int, int], color_mode: str, skip_unreadable: bool = False,
                 report: Callable[[str], None] = print):
        self.path = Path(path)
        self.image_size = image_size
        self.color_mode = color_mode
        self.skip_unreadable = skip_unreadable
        self.report = report

    def load(self) -> Dataset:
        import tempfile

        if self.color_mode not in ("rgb", "grayscale", "rgba"):
            raise DataError(f"--color-mode must be rgb, grayscale or rgba, got {self.color_mode!r}")
        bad = unreadable_images(self.path)
        if not bad:
            return self._load(self.path)
        if not self.skip_unreadable:
            raise DataError(f"{bad[0][0]} is not an image TensorFlow can decode ({bad[0][1]})"
                            + (f"; {len(bad) - 1} more file(s) are not either" if len(bad) > 1 else "")
                            + "; fix or remove it, or pass --skip-unreadable to leave such files out")
        self.report(f"[data] left out {len(bad)} image file(s) that cannot be decoded, the first {bad[0][0]} "
                    "(--skip-unreadable)")
        with tempfile.TemporaryDirectory(prefix="images-") as tmp:
            # The readable files as links in the same layout: Keras reads them as before.
            skipped = {path for path, _ in bad}
            for path in image_files(self.path):
                if path not in skipped:
                    link = Path(tmp) / path.relative_to(self.path)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path.resolve())
            return self._load(Path(tmp), source=str(self.path))

    def _load(self, folder: Path, source: str | None = None) -> Dataset:
        import keras

        try:
            ds = keras.utils.image_dataset_from_directory(
                str(folder), labels="inferred", label_mode="int", image_size=self.image_size,
                color_mode=self.color_mode, batch_size=None, shuffle=False, verbose=False)
        except ValueError as exc:
            raise DataError(f"{self.path}: {exc}") from None
        xs, ys = [], []
        for image, label in ds.as_numpy_iterator():
            xs.append(image)
            ys.append(label)
        if not xs:
            raise DataError(f"{self.path} holds no images in class sub-folders")
        return validate(Dataset(np.stack(xs).astype("float32"), np.array(ys, dtype="int64"),
                                tuple(ds.class_names), source or str(self.path)))


# The files Keras's image_dataset_from_directory reads (its ALLOWLIST_FORMATS).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder of class sub-folders, in the order Keras reads them."""
    files = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for root, _, names in sorted(os.walk(sub), key=lambda entry: entry[0]):
            files += [Path(root) / n for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
    return files


def unreadable_images(folder: Path) -> list[tuple[Path, str]]:
    """(file, why) for each image file TensorFlow cannot decode (as Keras would decode it), so a
    broken file is named in one line instead of failing deep in a TensorFlow traceback."""
    import tensorflow as tf

    bad = []
    for path in image_files(folder):
        try:
            tf.io.decode_image(tf.io.read_file(str(path)), expand_animations=False)
        except (tf.errors.OpError, ValueError) as exc:
            bad.append((path, str(getattr(exc, "message", exc)).splitlines()[0][:200]))
    return bad


def open_source(spec: str, options: DataOptions | None = None) -> DataSource:
    """Resolve a `--data` argument of arrays: `digits`, an `.npz` file, or a folder of images
    (tables have their own reader, `training.tables`)."""
    options = options or DataOptions()
    if spec == "digits":
        return DigitsSource()
    if spec.endswith(".npz"):
        return NpzSource(Path(spec))
    if is_table(spec):
        raise DataError(f"{spec} is a table or a folder of texts: its named columns train through "
                        "training.table_pipeline")
    if Path(spec).is_dir():
        return ImageFolderSource(Path(spec), options.image_size, options.color_mode, options.skip_unreadable)
    raise DataError(
        f"unknown data source {spec!r}: use 'digits', a path ending in .npz, a table (.csv, .tsv, .txt, "
        ".parquet), or a folder with one sub-folder of images (or of .txt files) per class"
    )


def validate(data: Dataset) -> Dataset:
    """Refuse data that cannot train a classifier, naming the problem."""
    if len(data.x) != len(data.y):
        raise DataError(f"{data.source}: x has {len(data.x)} rows but y has {len(data.y)}")
    bad = first_nonfinite_row(data.x)
    if bad is not None:
        raise DataError(f"{data.source}: x holds NaN or infinite values (first in row {bad})")
    present = np.unique(data.y)
    if len(present) < 2:
        raise DataError(f"{data.source}: labels hold {len(present)} class; a classifier needs at least 2")
    return data


def hold_out(data: Dataset, classes: tuple[str, ...]) -> tuple[Dataset, np.ndarray]:
    """(the data without the named classes, their rows): for an out-of-distribution check, the
    ensemble is trained on the rest and asked about these rows it has never seen a class of."""
    unknown = [c for c in classes if c not in data.classes]
    if unknown:
        raise DataError(f"--ood-holdout names {', '.join(map(repr, unknown))}, not classes of {data.source} "
                        f"({', '.join(data.classes)})")
    known = tuple(c for c in data.classes if c not in classes)
    if len(known) < 2:
        raise DataError(f"--ood-holdout leaves {len(known)} class; a classifier needs at least 2")
    held = np.isin(data.y, [data.classes.index(c) for c in classes])
    new_index = np.full(len(data.classes), -1, dtype=np.int64)
    new_index[[data.classes.index(c) for c in known]] = np.arange(len(known))
    return Dataset(data.x[~held], new_index[data.y[~held]], known, data.source), data.x[held]


def split(data: Dataset, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Splits:
    """Stratified train/validation/test splits, the same for the same data and seed."""
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError("validation and test fractions must be in (0, 1) and sum to less than 1")
    counts = np.bincount(data.y, minlength=len(data.classes))
    present = np.flatnonzero(counts)
    rarest = int(present[np.argmin(counts[present])])
    # Each split needs at least one row of every class for stratification.
    if counts[rarest] < 3:
        raise DataError(
            f"{data.source}: class {data.classes[rarest]!r} has {counts[rarest]} row(s); "
            "every class needs at least 3 to fill train, validation and test"
        )
    idx = np.arange(len(data.y))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=data.y)
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (1 - test_fraction),
            random_state=seed,
            stratify=data.y[rest],
        )
    except ValueError as exc:
        raise DataError(f"{data.source}: too few rows to split ({len(idx)}): {exc}") from None
    pick = lambda i: Dataset(data.x[i], data.y[i], data.classes, data.source)  # noqa: E731
    return Splits(pick(np.sort(train)), pick(np.sort(val)), pick(np.sort(test)))


def fingerprint(data: Dataset) -> str:
    """sha256 over shapes, dtypes, values and class names: equal data, equal fingerprint."""
    h = hashlib.sha256()
    for array in (data.x, data.y):
        h.update(f"{array.shape}|{array.dtype.str}|".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    h.update("\x00".join(data.classes).encode())
    return h.hexdigest()


def normalization_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over all but the last axis; constant features get variance 1."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes, dtype="float64")
    var = x.var(axis=axes, dtype="float64")
    # A feature constant in training would be divided by ~0 and blow up on any other value.
    var = np.where(var > 1e-12, var, 1.0)
    return mean.astype("float32"), var.astype("float32")
