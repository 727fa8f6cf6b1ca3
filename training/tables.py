"""Tables as they come: CSV and Parquet files with named columns of numbers, categories and
missing values, read with pyarrow into named feature columns and an encoded target.

Every feature column keeps its name and gets a kind: `numeric` (numbers, float64, NaN where
missing), `integer` (an integer category such as a code 0..3: whole numbers as float64, NaN
where missing), `string` (a string category: Python `str`, "" where missing) or `text` (free
text, tokenised inside the members: Python `str`, "" where missing). The kind is inferred from
the values and can be overridden by name (`categorical`, `numeric`, `text`, `ignore`). The label
column(s) become the target of one task of `contract.manifest.TASKS`.

What counts as what, in every file format alike:
- a cell is *missing* when it is empty, null, NaN or one of `NULL_SPELLINGS` (after the spaces
  around it are stripped: they are never part of a value);
- a cell is a *number* when it reads as a finite decimal number (`12`, `-0.5`, `1e3`);
  anything else ("1,5", "0x10") is text;
- a cell is *infinity* when it is one (a Parquet float) or reads as one (`inf`, `-Infinity`,
  `1e999`): in a column whose other present cells are all numbers it is a DataError naming the
  cell (an overflow or a division by zero upstream, not a category), unless the column is named
  `categorical` or `text`; among words it is a word like any other;
- a Parquet bool column is an `integer` category of 0 and 1 (JSON's true/false are no numbers,
  and a client sends a code as a number), with a note; as a label its classes stay false/true;
- a column whose present cells are all numbers is `numeric`, except one that looks like a code
  (`looks_like_codes`: whole numbers, at most `MAX_CATEGORY_CODES` distinct values, and at most
  `CATEGORY_SHARE` of its present cells distinct, i.e. each value repeats about 20 times or
  more), which is `integer`;
- a column of words is `text` when it has at least `TEXT_MIN_DISTINCT` distinct values and they
  are long (a mean of `TEXT_MEAN_CHARS` characters or more) or mostly distinct (more than
  `TEXT_DISTINCT_SHARE` of the present cells) with `TEXT_MIN_WORDS` words or more on average
  (`looks_like_text`): reviews, descriptions, messages. Few distinct values, however long, are
  categories; short distinct values of a word or two (ids, names) are no text either;
- any other column is `string`.

Every problem is a `training.data.DataError` whose message names the file and what to change.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from contract.manifest import TASKS
from training.data import DataError, Dataset, split

# Files larger than this are refused before they are read: a table is held in memory whole.
MAX_TABLE_BYTES = 2 * 1024**3
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
# The CSV delimiter, when not given, is sniffed among these from the file's first bytes.
DELIMITERS = ",;\t|"
SNIFF_BYTES = 64 * 1024
NULL_SPELLINGS = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?")
MAX_CATEGORY_CODES = 10
CATEGORY_SHARE = 0.05
# Fewer rows with a label than this cannot fill train, validation and test meaningfully.
MIN_ROWS = 10
# A column of words is text (looks_like_text) past these; see the module's docstring.
TEXT_MIN_DISTINCT = 50
TEXT_MEAN_CHARS = 30
TEXT_DISTINCT_SHARE = 0.5
TEXT_MIN_WORDS = 3
KINDS = ("numeric", "integer", "string", "text")
# The kinds whose values are Python strings ("" where missing).
STRING_KINDS = ("string", "text")
# A finite decimal number; Arrow's cast reads every text this matches.
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
# Infinity spelled out (any case), as Arrow's cast, pandas and numpy write and read it.
_INFINITY = r"^[+-]?inf(inity)?$"
# csv.field_size_limit takes a C long, 32 bits on some platforms.
_MAX_CSV_FIELD = 2**31 - 1
# Two-valued labels whose order is known: (negative, positive).
_ORDERED_PAIRS = (("0", "1"), ("false", "true"), ("no", "yes"))


@dataclass(frozen=True)
class Table:
    """Named feature columns of known kinds and the encoded target of one task.

    `labels` are the classes for `classification` and `binary` (negative first), and the label
    column names for `multilabel` and `regression`; `label_columns` names the columns read.
    """

    columns: dict[str, np.ndarray]
    kinds: dict[str, str]
    target: np.ndarray
    labels: tuple[str, ...]
    task: str
    source: str
    label_columns: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        """How many rows (examples) the table holds."""
        return int(len(self.target))

    def kind_counts(self) -> dict[str, int]:
        """How many feature columns there are of each kind (kinds with none left out)."""
        counts = {kind: sum(k == kind for k in self.kinds.values()) for kind in KINDS}
        return {kind: n for kind, n in counts.items() if n}

    def describe(self) -> str:
        """One line for the trainer's report: rows, feature columns by kind, target and task."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.kind_counts().items())
        columns = f"{len(self.columns)} column{'s' if len(self.columns) != 1 else ''}: {kinds}"
        names = ", ".join(map(repr, self.label_columns))
        target = f"target{'s' if len(self.label_columns) > 1 else ''} {names}"
        if self.task == "classification":
            what = f"classification, {len(self.labels)} classes"
        elif self.task == "binary":
            what = f"binary: {self.labels[0]} / {self.labels[1]}"
        else:
            what = self.task
        return f"{self.rows} rows; {columns}; {target} ({what})"


def read_table(path: str | Path, label_columns: Sequence[str], task: str | None, *,
               delimiter: str | None = None, categorical: Sequence[str] = (),
               numeric: Sequence[str] = (), ignore: Sequence[str] = (), text: Sequence[str] = ()) -> Table:
    """Read a CSV or Parquet file into named feature columns and the target of one task."""
    labels, categorical, numeric, ignore, text = (_names(v) for v in (label_columns, categorical, numeric,
                                                                       ignore, text))
    _check_arguments(path, labels, task, categorical, numeric, ignore, text)
    file = _open(path, delimiter)
    _check_columns(file, labels, categorical, numeric, ignore, text)
    skip = set(ignore) | set(file.skipped)
    features = [n for n in file.names if n not in skip and n not in labels]
    if not features:
        dropped = f" (ignored: {', '.join(sorted(skip))})" if skip else ""
        raise DataError(f"{path}: no feature columns left besides the label column(s) "
                        f"{', '.join(map(repr, labels))}{dropped}; a model needs at least one")
    cells = file.read([n for n in file.names if n not in skip])
    notes = list(file.notes)
    keep, dropped_note = _rows_with_labels(file, cells, labels)
    notes += dropped_note
    task, target, names, target_notes = _target(file, cells, labels, task, keep)
    notes += target_notes
    columns, kinds = {}, {}
    for name in features:
        kind, values, kind_notes = _kind(file, name, cells[name], keep, name in categorical, name in numeric,
                                         name in text)
        columns[name] = values
        kinds[name] = kind
        notes += kind_notes + _missing_note(name, kind, cells[name].missing[keep])
    return Table(columns, kinds, target, names, task, str(path), labels, tuple(notes))


def split_table(table: Table, seed: int, val_fraction: float = 0.15,
                test_fraction: float = 0.2) -> tuple[Table, Table, Table]:
    """Train, validation and test tables, the same for the same table and seed; stratified by class."""
    stratified = table.task in ("classification", "binary")
    # training.data.split holds the one rule (stratified, every class at least 3 rows, rows
    # sorted), so it is given the row numbers as its features and hands them back split. With
    # the same class for every row, its stratified split is a plain shuffled one.
    y = table.target if stratified else np.zeros(table.rows, dtype=np.int64)
    classes = table.labels if stratified else ("every row",)
    rows = Dataset(np.arange(table.rows)[:, None], y, classes, table.source)
    parts = split(rows, seed, val_fraction, test_fraction)
    return tuple(_take(table, part.x[:, 0]) for part in (parts.train, parts.val, parts.test))


def fingerprint_table(table: Table) -> str:
    """sha256 over names, kinds, values, target and labels: equal tables, equal fingerprint."""
    # 0xfe and 0xff never occur in UTF-8, so they separate texts unambiguously; numbers are
    # fixed-width once the row count is known.
    h = hashlib.sha256(f"table/1|{table.task}|{table.rows}|{len(table.columns)}".encode())
    for name, values in table.columns.items():
        kind = table.kinds[name]
        h.update(b"\xfe" + name.encode() + b"\xff" + kind.encode() + b"\xff")
        if kind in STRING_KINDS:
            h.update(b"\xff".join(v.encode() for v in values))
        else:
            # Every NaN the same: a missing value has no payload worth telling apart.
            h.update(np.where(np.isnan(values), np.nan, values).astype("<f8").tobytes())
    h.update(f"\xfe{table.target.dtype.str}|{table.target.shape}".encode())
    h.update(np.ascontiguousarray(table.target).tobytes())
    h.update(b"\xfe" + b"\xff".join(label.encode() for label in table.labels))
    h.update(b"\xfe" + b"\xff".join(name.encode() for name in table.label_columns))
    return h.hexdigest()


def looks_like_codes(distinct: int, present: int) -> bool:
    """Whether whole numbers with `distinct` values in `present` cells look like category codes."""
    # A code repeats: few values, each seen about 1/CATEGORY_SHARE times or more. A count or a
    # measurement in whole units (age, 0..200) has more values, or too few rows to tell.
    return distinct <= MAX_CATEGORY_CODES and distinct <= CATEGORY_SHARE * present


def looks_like_text(distinct: int, present: int, mean_chars: float, mean_words: float) -> bool:
    """Whether a column of words with `distinct` values in `present` cells, of these mean lengths
    in characters and in words, is free text rather than a category."""
    # A category repeats; text rarely does. Long values are text once there are enough of them
    # to be no short list of categories; shorter ones when they are mostly distinct phrases.
    if distinct < TEXT_MIN_DISTINCT:
        return False
    return mean_chars >= TEXT_MEAN_CHARS or (distinct > TEXT_DISTINCT_SHARE * present
                                             and mean_words >= TEXT_MIN_WORDS)


def show_number(value: float) -> str:
    """A number as a person writes it: `3` for 3.0, `0.1` for 0.1."""
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Cells:
    """One column's cells as read: the number in each cell that holds a finite number, which
    cells are missing, which hold infinity, and their texts (made only for the rows and columns
    that need them); `boolean` for a column of true/false, its numbers 1/0."""

    def __init__(self, numbers: np.ndarray, missing: np.ndarray,
                 texts: Callable[[np.ndarray], np.ndarray], infinite: np.ndarray | None = None,
                 boolean: bool = False):
        self.numbers = numbers  # float64, NaN where missing or not a finite number
        self.missing = missing
        self._texts = texts
        self.words = ~missing & np.isnan(numbers)  # present, but not a number
        self.infinite = np.zeros_like(missing) if infinite is None else infinite  # among the words
        self.boolean = boolean

    def text(self, rows: np.ndarray) -> np.ndarray:
        """The cells of these rows as an object array of `str`, "" where missing."""
        return self._texts(np.asarray(rows, dtype=np.int64))


class _File:
    """A table file opened for reading: its column names in order, the columns read on demand,
    and where a row is in the file (for messages)."""

    def __init__(self, path: str | Path):
        self.path = path
        self.names: list[str] = []
        self.skipped: tuple[str, ...] = ()  # columns that are no data (a saved pandas index)
        self.notes: tuple[str, ...] = ()

    def read(self, names: list[str]) -> dict[str, _Cells]:
        raise NotImplementedError

    def where(self, row: int) -> str:
        raise NotImplementedError

    def hint(self) -> str:
        return ""


class _CsvFile(_File):
    def __init__(self, path: str | Path, delimiter: str | None):
        super().__init__(path)
        if delimiter is not None and (len(delimiter) != 1 or delimiter in '"\r\n'):
            raise DataError(f"{path}: the delimiter must be one character other than a quote or a "
                            f"line break, got {delimiter!r}")
        self.delimiter = delimiter or _sniff_delimiter(path)
        self.names = _csv_header(path, self.delimiter)

    def read(self, names: list[str]) -> dict[str, _Cells]:
        try:
            table = pacsv.read_csv(
                self.path,
                read_options=pacsv.ReadOptions(column_names=self.names, skip_rows=1),
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True),
                # Every cell as text: missing values and numbers are told apart here, one way
                # for every format, and label texts stay as they were written.
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in self.names},
                                                     include_columns=names, strings_can_be_null=False))
        except pa.ArrowInvalid as exc:
            raise self._problem(exc) from None
        except OSError as exc:
            raise DataError(f"{self.path} cannot be read: {exc}") from None
        if table.num_rows == 0:
            raise DataError(f"{self.path} has a header but no rows")
        return {name: _text_cells(table.column(name)) for name in names}

    def where(self, row: int) -> str:
        # pyarrow skips empty lines and reads quoted line breaks: count the lines the same way.
        # A place in a message is not worth a traceback: unfound, the row is named by its number.
        try:
            with _long_csv_fields(self.path):
                for index, (line, _) in enumerate(_records(self.path, self.delimiter)):
                    if index == row + 1:
                        return f"line {line}"
        except (csv.Error, UnicodeDecodeError, OSError):
            pass
        return f"data row {row + 1}"

    def hint(self) -> str:
        return f" (read with delimiter {self.delimiter!r}; pass delimiter= if the file uses another)"

    def _problem(self, exc: pa.ArrowInvalid) -> DataError:
        text = str(exc)
        if "invalid UTF8" in text:
            return not_utf8(self.path)
        if "Expected" in text and "columns, got" in text:
            try:
                with _long_csv_fields(self.path):
                    for line, fields in _records(self.path, self.delimiter):
                        if len(fields) != len(self.names):
                            return DataError(
                                f"{self.path}, line {line}: {len(fields)} fields, the header has "
                                f"{len(self.names)}; fix the line, or quote a field that holds "
                                f"{self.delimiter!r}")
            except (csv.Error, UnicodeDecodeError, OSError):
                pass
        return DataError(f"{self.path} is not a readable CSV file: {_first_line(text)}")


class _ParquetFile(_File):
    def __init__(self, path: str | Path):
        super().__init__(path)
        try:
            metadata = pq.read_metadata(path)
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path} is not a readable Parquet file: {_first_line(str(exc))}") from None
        # Compressed and encoded on disk, whole in memory: the limit applies to what it expands
        # to, at least its decoded pages and 8 bytes a cell (a float64 or a reference to a str).
        decoded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        _check_size(path, max(decoded, 8 * metadata.num_rows * metadata.num_columns),
                    "takes at least", "in memory")
        self.names = list(schema.names)
        _check_header(path, self.names)
        index = (schema.pandas_metadata or {}).get("index_columns", [])
        self.skipped = tuple(n for n in index if isinstance(n, str) and n in self.names)
        self.notes = tuple(f"column {n!r} is the index pandas saved with the table: not read"
                           for n in self.skipped)
        if metadata.num_rows == 0:
            raise DataError(f"{path} holds no rows")

    def read(self, names: list[str]) -> dict[str, _Cells]:
        try:
            table = pq.read_table(self.path, columns=names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.path} is not a readable Parquet file: {_first_line(str(exc))}") from None
        return {name: self._cells(name, table.column(name)) for name in names}

    def where(self, row: int) -> str:
        return f"row {row + 1}"

    def _cells(self, name: str, column: pa.ChunkedArray) -> _Cells:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column = pc.cast(column, kind.value_type)
            kind = kind.value_type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            return _number_cells(pc.cast(column, pa.float64()).to_numpy())
        if pa.types.is_boolean(kind):
            return _bool_cells(column)
        if (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_temporal(kind)
                or pa.types.is_null(kind)):
            # Dates and times are categories or text, as they are in a CSV file.
            return _text_cells(pc.cast(column, pa.string()))
        raise DataError(f"{self.path}: column {name!r} holds {kind} values, which are neither numbers "
                        "nor text; add it to ignore")


def _open(path: str | Path, delimiter: str | None) -> _File:
    """The file behind `path`, checked to exist, to be a table by its suffix, and not too large."""
    where = Path(path)
    suffix = where.suffix.lower()
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:
        raise DataError(f"{path}: a table file ends in {', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}, "
                        f"not {suffix or 'nothing'!r}; rename it to say what it holds")
    if not where.exists():
        raise DataError(f"data file {path} does not exist")
    if not where.is_file():
        raise DataError(f"{path} is not a file")
    _check_size(path, where.stat().st_size, "is", "on disk")
    return _CsvFile(path, delimiter) if suffix in CSV_SUFFIXES else _ParquetFile(path)


def _check_size(path: str | Path, size: int, verb: str, where: str) -> None:
    if size > MAX_TABLE_BYTES:
        raise DataError(f"{path} {verb} {_gib(size)} {where}; tables of up to {_gib(MAX_TABLE_BYTES)} "
                        "are read (MAX_TABLE_BYTES in training/tables.py): sample the rows or "
                        "drop columns first")


def _gib(size: int) -> str:
    return f"{size / 1024**3:.3g} GiB"


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    """Column names as a tuple; one name on its own is one name, not its letters."""
    return (value,) if isinstance(value, str) else tuple(value)


def _check_arguments(path: str | Path, labels: tuple[str, ...], task: str | None,
                     categorical: tuple[str, ...], numeric: tuple[str, ...],
                     ignore: tuple[str, ...], text: tuple[str, ...]) -> None:
    if task is not None and task not in TASKS:
        raise DataError(f"{path}: unknown task {task!r}; use one of {', '.join(TASKS)}, or none to infer it")
    if not labels:
        raise DataError(f"{path}: name the label column(s)")
    if len(set(labels)) != len(labels):
        raise DataError(f"{path}: a label column is named twice in {', '.join(map(repr, labels))}")
    if task in ("classification", "binary") and len(labels) != 1:
        raise DataError(f"{path}: {task} takes one label column, got {len(labels)} "
                        f"({', '.join(map(repr, labels))}); --task multilabel or regression takes several")
    if task == "multilabel" and len(labels) < 2:
        raise DataError(f"{path}: multilabel takes two or more label columns, got {labels[0]!r}; "
                        "one 0/1 column is --task binary")
    options = {"categorical": categorical, "numeric": numeric, "text": text, "ignore": ignore}
    for option, names in options.items():
        for name in names:
            if name in labels:
                raise DataError(f"{path}: {name!r} is a label column; it cannot also be in {option}")
            others = [o for o in options if o != option and name in options[o]]
            if others:
                raise DataError(f"{path}: {name!r} is in both {option} and {others[0]}; keep it in one")


def _check_columns(file: _File, labels: tuple[str, ...], categorical: tuple[str, ...],
                   numeric: tuple[str, ...], ignore: tuple[str, ...], text: tuple[str, ...]) -> None:
    listing = f"(columns: {', '.join(file.names)})"
    for name in labels:
        if name not in file.names:
            raise DataError(f"{file.path} has no column {name!r} {listing}; name the label column "
                            f"with --label-column{file.hint()}")
    unknown = [f"{name!r} (in {option})"
               for option, names in (("categorical", categorical), ("numeric", numeric), ("text", text),
                                     ("ignore", ignore))
               for name in names if name not in file.names]
    if unknown:
        raise DataError(f"{file.path} has no column {', '.join(unknown)} {listing}")


def _check_header(path: str | Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        if not name:
            raise DataError(f"{path}: column {i + 1} has no name in the header (a saved index?); "
                            "give it a name, and add it to ignore if it is no feature")
        if names.index(name) != i:
            raise DataError(f"{path}: the header names column {name!r} twice; rename one")


def _sniff_delimiter(path: str | Path) -> str:
    """The delimiter among DELIMITERS that splits the file's first lines alike, else `,`."""
    try:
        with open(path, "rb") as f:
            sample = f.read(SNIFF_BYTES)
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc}") from None
    text = sample.decode("utf-8", errors="replace").lstrip("\ufeff")
    if len(sample) == SNIFF_BYTES:
        text = text[: text.rfind("\n") + 1] or text  # whole lines only
    try:
        return csv.Sniffer().sniff(text, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return "\t" if Path(path).suffix.lower() == ".tsv" else ","


def _csv_header(path: str | Path, delimiter: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except csv.Error as exc:
        raise DataError(f"{path}, line 1: the header is not readable CSV ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc}") from None
    if not header:
        raise DataError(f"{path} is empty; it needs a header row naming the columns")
    names = [name.strip() for name in header]
    _check_header(path, names)
    return names


@contextlib.contextmanager
def _long_csv_fields(path: str | Path) -> Iterator[None]:
    """The csv module reading fields as long as the file (pyarrow reads any), for this pass only."""
    # csv refuses a field over 131,072 characters by default; no field is longer than its file.
    before = csv.field_size_limit()
    csv.field_size_limit(min(_MAX_CSV_FIELD, max(before, Path(path).stat().st_size)))
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _records(path: str | Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-empty record, the header first."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        end = 0
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields:
                yield start, fields


def not_utf8(path: str | Path) -> DataError:
    """A DataError naming the line and byte where the file stops being UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # exc.object is the chunk with at most 3 bytes of a character begun before it,
                # which hold no line break.
                line += exc.object.count(b"\n", 0, exc.start)
                return DataError(f"{path}, line {line}: byte 0x{exc.object[exc.start]:02x} is not "
                                 "UTF-8; save the file as UTF-8 text")
            line += chunk.count(b"\n")
    return DataError(f"{path} is not UTF-8 text; save it as UTF-8")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _text_cells(column: pa.ChunkedArray) -> _Cells:
    """Cells from text: missing spellings, numbers and words told apart, spaces around stripped."""
    text = pc.utf8_trim_whitespace(pc.fill_null(column, ""))
    missing = pc.is_in(text, value_set=pa.array(NULL_SPELLINGS))
    numeric_text = pc.if_else(pc.match_substring_regex(text, _NUMBER), text, pa.scalar(None, pa.string()))
    numbers = pc.cast(numeric_text, pa.float64()).to_numpy()
    # 1e999 reads as inf: infinity like "inf" itself, and no number.
    infinite = np.isinf(numbers) | pc.match_substring_regex(text, _INFINITY, ignore_case=True).to_numpy()
    numbers = np.where(np.isfinite(numbers), numbers, np.nan)
    shown = pc.if_else(missing, "", text)
    return _Cells(numbers, missing.to_numpy(), lambda rows: shown.take(rows).to_numpy(), infinite)


def _number_cells(values: np.ndarray) -> _Cells:
    """Cells from numbers: NaN is missing; an infinity is no number, shown as it prints."""
    missing = np.isnan(values)
    numbers = np.where(np.isfinite(values), values, np.nan)

    def texts(rows: np.ndarray) -> np.ndarray:
        return np.array(["" if missing[r] else show_number(values[r]) for r in rows], dtype=object)

    return _Cells(numbers, missing, texts, np.isinf(values))


def _bool_cells(column: pa.ChunkedArray) -> _Cells:
    """Cells from true/false: 1/0 as numbers, null missing, shown as `true`/`false`."""
    numbers = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)  # null is NaN
    missing = np.isnan(numbers)

    def texts(rows: np.ndarray) -> np.ndarray:
        return np.array(["" if missing[r] else ("true" if numbers[r] else "false") for r in rows], dtype=object)

    return _Cells(numbers, missing, texts, boolean=True)


def _rows_with_labels(file: _File, cells: dict[str, _Cells],
                      labels: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """The rows whose every label cell holds a value, and a note on the rows dropped."""
    for name in labels:
        if cells[name].missing.all():
            raise DataError(f"{file.path}: label column {name!r} has no value in any row")
    missing = np.logical_or.reduce([cells[name].missing for name in labels])
    keep = np.flatnonzero(~missing)
    which = f"label {labels[0]!r}" if len(labels) == 1 else "a label column"
    if len(keep) < MIN_ROWS:
        raise DataError(f"{file.path}: {len(keep)} rows have a value in {which}; at least {MIN_ROWS} "
                        "are needed to train, validate and test")
    if not missing.any():
        return keep, []
    first = file.where(int(np.argmax(missing)))
    return keep, [f"{int(missing.sum())} of {len(missing)} rows dropped: no value in {which} "
                  f"(the first at {first})"]


def _target(file: _File, cells: dict[str, _Cells], labels: tuple[str, ...], task: str | None,
            keep: np.ndarray) -> tuple[str, np.ndarray, tuple[str, ...], list[str]]:
    """(task, target, labels, notes): the label columns encoded for the task, inferred if none."""
    if task == "regression":
        for name in labels:
            _refuse_words(file, name, cells[name], keep, "regression labels are numbers")
        target = np.stack([cells[name].numbers[keep] for name in labels], axis=1)
        return task, target.astype(np.float32), labels, []
    if len(labels) > 1:
        flags = [_zero_one(cells[name], keep) for name in labels]
        bad = next(((name, row) for name, (_, row) in zip(labels, flags) if row is not None), None)
        if bad is not None:
            name, row = bad
            value = cells[name].text([row])[0]
            if task == "multilabel":
                raise DataError(f"{file.path}, {file.where(row)}: label {name!r} holds {value!r}; "
                                "multilabel labels are 0/1, true/false or yes/no")
            raise DataError(f"{file.path}: several label columns and no task, and {name!r} holds "
                            f"{value!r} ({file.where(row)}), not 0/1; name the task: --task "
                            "regression for numbers, --task multilabel for 0/1 columns")
        target = np.stack([values for values, _ in flags], axis=1)
        return "multilabel", target, labels, []
    name = labels[0]
    classes, index = _classes(cells[name], keep)
    if len(classes) < 2:
        raise DataError(f"{file.path}: label {name!r} holds one value ({classes[0]!r}); "
                        "a classifier needs at least 2")
    notes = []
    if task == "binary" or (task is None and len(classes) == 2):
        if len(classes) != 2:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise DataError(f"{file.path}: binary needs exactly 2 values in label {name!r}, it holds "
                            f"{len(classes)} ({shown}); use --task classification")
        if task is None:
            notes.append(f"2 classes in {name!r}: trained as binary; --task classification to keep softmax")
        order = binary_order(classes)
        index = index if order == classes else 1 - index
        return "binary", index, order, notes
    if task is None and not cells[name].words[keep].any() and len(classes) > MAX_CATEGORY_CODES:
        # A softmax over hundreds of measured values is rarely what was meant: ask.
        raise DataError(f"{file.path}: label {name!r} holds {len(classes)} distinct numbers; say what to "
                        "predict: --task regression for the number, --task classification for "
                        f"{len(classes)} classes")
    return "classification", index, classes, notes


def _classes(cells: _Cells, keep: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Sorted classes and each row's index into them: by value when every cell is a number (and
    as `false`/`true` from a bool column, as a CSV file writes them)."""
    if cells.words[keep].any() or cells.boolean:
        values, index = np.unique(cells.text(keep), return_inverse=True)
        return tuple(str(v) for v in values), index.astype(np.int64)
    values, index = np.unique(cells.numbers[keep], return_inverse=True)
    return tuple(show_number(v) for v in values), index.astype(np.int64)


def binary_order(classes: tuple[str, ...]) -> tuple[str, ...]:
    """(negative, positive): 0/1, false/true, no/yes in that order (any case), else sorted."""
    lowered = {c.lower() for c in classes}
    for negative, positive in _ORDERED_PAIRS:
        if lowered == {negative, positive}:
            return tuple(sorted(classes, key=lambda c: c.lower() == positive))
    return classes


def _zero_one(cells: _Cells, keep: np.ndarray) -> tuple[np.ndarray, int | None]:
    """A 0/1 column's values as float32, and the first row (in the file) holding another value."""
    numbers = cells.numbers[keep]
    ones, zeros = numbers == 1, numbers == 0
    if cells.words[keep].any():
        lowered = np.array([t.lower() for t in cells.text(keep)], dtype=object)
        ones |= np.isin(lowered, ("true", "yes"))
        zeros |= np.isin(lowered, ("false", "no"))
    bad = np.flatnonzero(~(ones | zeros))
    return ones.astype(np.float32), (int(keep[bad[0]]) if bad.size else None)


def _refuse_words(file: _File, name: str, cells: _Cells, keep: np.ndarray, why: str) -> None:
    """A DataError at the first cell of these rows that holds a value but not a number."""
    words = np.flatnonzero(cells.words[keep])
    if words.size:
        row = int(keep[words[0]])
        raise DataError(f"{file.path}, {file.where(row)}: column {name!r} holds "
                        f"{cells.text([row])[0]!r}, not a number; {why}")


def _refuse_infinity(file: _File, name: str, cells: _Cells, keep: np.ndarray) -> None:
    """A DataError at the first infinity of these rows when every other present cell is a number."""
    infinite = cells.infinite[keep]
    if infinite.any() and not (cells.words[keep] & ~infinite).any():
        row = int(keep[np.argmax(infinite)])
        raise DataError(f"{file.path}, {file.where(row)}: column {name!r} holds {cells.text([row])[0]!r}; a number "
                        "must be finite: replace it or leave the column out with --ignore-columns")


def _kind(file: _File, name: str, cells: _Cells, keep: np.ndarray, categorical: bool, numeric: bool,
          text: bool) -> tuple[str, np.ndarray, list[str]]:
    """A feature column's kind (see the module's docstring), its values in these rows as the
    kind holds them, and a note when the kind may surprise."""
    missing = cells.missing[keep]
    if missing.all():
        raise DataError(f"{file.path}: column {name!r} has no value in any row; add it to ignore")
    if text:
        return "text", cells.text(keep), []
    if not categorical:
        _refuse_infinity(file, name, cells, keep)
    if cells.boolean:
        return ("numeric" if numeric else "integer"), cells.numbers[keep], [
            f"column {name!r}: true/false read as 1/0"]
    if numeric:
        _refuse_words(file, name, cells, keep,
                      f"fix the cell, leave it empty for a missing value, or take {name!r} out of numeric")
        return "numeric", cells.numbers[keep], []
    words = cells.words[keep]
    values = cells.numbers[keep][~missing]
    if words.any():
        present = len(values)
        texts = cells.text(keep)
        if categorical:
            return "string", texts, []
        if 2 * words.sum() >= present:
            return ("text" if _is_text(texts[~missing]) else "string"), texts, []
        row = int(keep[np.argmax(words)])
        return "string", texts, [f"column {name!r}: {int(words.sum())} of {present} values are not numbers "
                                 f"(the first {cells.text([row])[0]!r} at {file.where(row)}), so it is read "
                                 "as a string category; fix those cells, or list it in numeric to make them errors"]
    whole = bool(np.all(values == np.floor(values)))
    if categorical:
        return ("integer", cells.numbers[keep], []) if whole else ("string", cells.text(keep), [])
    codes = whole and looks_like_codes(len(np.unique(values)), len(values))
    return ("integer" if codes else "numeric"), cells.numbers[keep], []


def _is_text(present: np.ndarray) -> bool:
    """`looks_like_text` on a column's present values."""
    chars = np.fromiter((len(v) for v in present), dtype=np.int64, count=len(present))
    words = np.fromiter((len(v.split()) for v in present), dtype=np.int64, count=len(present))
    return looks_like_text(len(set(present.tolist())), len(present), float(chars.mean()), float(words.mean()))


def _missing_note(name: str, kind: str, missing: np.ndarray) -> list[str]:
    count = int(missing.sum())
    if not count:
        return []
    kept = "kept as the empty string" if kind in STRING_KINDS else "kept, the model imputes them"
    return [f"column {name!r}: {count} of {len(missing)} cells missing ({kept})"]


def _take(table: Table, rows: np.ndarray) -> Table:
    return replace(table, columns={name: values[rows] for name, values in table.columns.items()},
                   target=table.target[rows])
