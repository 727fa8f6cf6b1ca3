"""A folder of texts: one sub-folder per class holding `.txt` files (the layout of
`keras.utils.text_dataset_from_directory`), read into a `training.tables.Table` of one `text`
column named `text` with the class as its target, so that it trains through the table pipeline
like any table with a text column.

    reviews/
        neg/  001.txt  002.txt ...
        pos/  001.txt  ...

Classes are the sub-folders' names, sorted; hidden sub-folders (`.git`, `.ipynb_checkpoints`)
are no classes. A class's files are every `.txt` file (any case) under its sub-folder, however
deep, but none in a hidden folder at any depth and no hidden file: Jupyter's checkpoint copies
(`pos/.ipynb_checkpoints/a-checkpoint.txt`) would repeat texts, across train and test. Each
file is decoded as UTF-8 (a byte-order mark is dropped) and the spaces around its text
stripped; an empty file is the empty text, the missing value of a text column. Two classes are
a `binary` task, as a table's two-valued label is, unless the task is given.

A file that is not UTF-8 stops the read with a DataError naming the file, its line and byte (a
file that cannot be read at all: the file and why), unless `skip_unreadable`: then it is left
out and a note says how many were and names the first.
The read is bounded (`MAX_FILE_BYTES` a file, `MAX_FOLDER_BYTES` in all), checked from the
files' sizes before any is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import DataError
from training.tables import MIN_ROWS, Table, binary_order, not_utf8

# Every text is held in memory: refuse a folder whose files add up to more than this.
MAX_FOLDER_BYTES = 1024**3
# One document larger than this is more likely a data dump than a text to classify.
MAX_FILE_BYTES = 10 * 1024**2
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"


def read_text_folder(path: str | Path, task: str | None = None, *, skip_unreadable: bool = False) -> Table:
    """Read a folder of class sub-folders of `.txt` files into a table of one text column."""
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files = class_files(folder)
    _check_task(folder, task, len(files))
    _check_sizes(folder, [f for found in files.values() for f in found])
    texts, target, skipped = [], [], []
    for index, (label, found) in enumerate(files.items()):
        read = 0
        for file in found:
            text = _read(file, skip_unreadable)
            if text is None:
                skipped.append(file)
                continue
            texts.append(text)
            target.append(index)
            read += 1
        if not read:
            raise DataError(f"{folder / label}: none of its {len(found)} .txt files is readable UTF-8 text, so class "
                            f"{label!r} has no examples; save them as UTF-8 or move the sub-folder out")
    classes = tuple(files)
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} file{'s' if len(skipped) > 1 else ''} skipped, unreadable or not UTF-8 text "
                     f"(--skip-unreadable); the first: {skipped[0]}")
    empty = sum(not t for t in texts)
    if empty:
        notes.append(f"column {TEXT_COLUMN!r}: {empty} of {len(texts)} files are empty "
                     "(kept as the empty text)")
    if len(texts) < MIN_ROWS:
        raise DataError(f"{folder}: {len(texts)} texts; at least {MIN_ROWS} are needed to train, validate and test")
    index = np.asarray(target, dtype=np.int64)
    if task == "binary" or (task is None and len(classes) == 2):
        if task is None:
            notes.append(f"2 classes in {folder}: trained as binary; --task classification to keep softmax")
        order = binary_order(classes)
        index = index if order == classes else 1 - index
        classes, task = order, "binary"
    else:
        task = "classification"
    return Table({TEXT_COLUMN: np.array(texts, dtype=object)}, {TEXT_COLUMN: "text"}, index, classes, task,
                 str(folder), (LABEL_COLUMN,), tuple(notes))


def class_files(folder: Path) -> dict[str, list[Path]]:
    """{class: its `.txt` files, sorted} for each class sub-folder, classes sorted by name."""
    try:
        subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        files = {d.name: sorted(f for f in d.rglob("*") if f.suffix.lower() == ".txt" and f.is_file()
                                and not is_hidden(f.relative_to(d)))
                 for d in subs}
    except OSError as exc:
        raise DataError(f"{folder} cannot be read: {exc}") from None
    if not files:
        raise DataError(f"{folder} holds no class sub-folders; put each class's .txt files in a sub-folder "
                        "named after the class")
    for label, found in files.items():
        if not found:
            raise DataError(f"{folder / label} holds no .txt files; every class sub-folder needs at least one "
                            f"(or move it out of {folder})")
    if len(files) < 2:
        raise DataError(f"{folder} has one class sub-folder ({next(iter(files))!r}); a classifier needs at "
                        "least 2")
    return files


def is_hidden(path: Path) -> bool:
    """Whether a path below a data folder is hidden, or inside a hidden folder."""
    return any(part.startswith(".") for part in path.parts)


def _check_task(folder: Path, task: str | None, classes: int) -> None:
    if task in ("multilabel", "regression"):
        raise DataError(f"{folder}: a folder of texts gives each text one class; --task {task} needs a table "
                        "with label columns")
    if task == "binary" and classes != 2:
        raise DataError(f"{folder}: binary needs exactly 2 class sub-folders, it has {classes}; "
                        "use --task classification")


def _check_sizes(folder: Path, files: list[Path]) -> None:
    """Refuse, before reading any, a file over MAX_FILE_BYTES or a folder over MAX_FOLDER_BYTES."""
    total = 0
    for file in files:
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise DataError(f"{file} cannot be read: {exc}") from None
        if size > MAX_FILE_BYTES:
            raise DataError(f"{file} is {_size(size)}; texts of up to {_size(MAX_FILE_BYTES)} are read "
                            "(MAX_FILE_BYTES in training/text_folder.py): split it or leave it out")
        total += size
    if total > MAX_FOLDER_BYTES:
        raise DataError(f"{folder} holds {_size(total)} of .txt files; up to {_size(MAX_FOLDER_BYTES)} are read "
                        "(MAX_FOLDER_BYTES in training/text_folder.py): sample the files first")


def _size(size: int) -> str:
    return f"{size:,} bytes" if size < 1024**2 else f"{size / 1024**2:.3g} MiB"


def _read(file: Path, skip_unreadable: bool) -> str | None:
    """The file's text, or None when it cannot be read (or is not UTF-8) and such files are skipped."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        if skip_unreadable:
            return None
        raise DataError(f"{file} cannot be read ({exc.strerror or exc}); fix it, or pass --skip-unreadable "
                        "to leave such files out") from None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        if skip_unreadable:
            return None
        raise DataError(f"{not_utf8(file)}, or pass --skip-unreadable to leave such files out") from None
