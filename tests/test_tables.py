"""training/tables.py: CSV and Parquet tables read with pyarrow, their kinds, targets, splits,
fingerprints and every refusal (no TF)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training import tables
from training.data import DataError
from training.tables import fingerprint_table, looks_like_codes, read_table, show_number, split_table

MISSING_BMI = (3, 17, 40, 100, 101, 250, 441)


def write(path, lines, delimiter=","):
    path.write_text("\n".join(delimiter.join(map(str, cells)) for cells in lines) + "\n", encoding="utf-8")
    return path


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


@pytest.fixture(scope="module")
def diabetes():
    from sklearn.datasets import load_diabetes

    return load_diabetes(scaled=False)


@pytest.fixture
def diabetes_csv(tmp_path, diabetes):
    """The diabetes data as a CSV: an id first, `sex` as words, some `bmi` cells empty, target `y`."""
    lines = [["id", *diabetes.feature_names, "y"]]
    for i, (row, y) in enumerate(zip(diabetes.data, diabetes.target)):
        cells = [repr(float(v)) for v in row]
        cells[1] = "female" if row[1] == 1 else "male"
        if i in MISSING_BMI:
            cells[2] = ""
        lines.append([f"p{i:04d}", *cells, repr(float(y))])
    return write(tmp_path / "diabetes.csv", lines)


def small(tmp_path, name="t.csv", rows=40, delimiter=",", **columns):
    """A file of `rows` rows with the given columns (lists are cycled), written as CSV."""
    names = list(columns)
    lines = [names] + [[columns[n][i % len(columns[n])] for n in names] for i in range(rows)]
    return write(tmp_path / name, lines, delimiter)


# Reading


def test_diabetes_reads_as_regression_with_a_string_column_and_missing_bmi(diabetes_csv, diabetes):
    table = read_table(diabetes_csv, ["y"], "regression", ignore=["id"])
    assert list(table.columns) == diabetes.feature_names
    assert table.kinds == {n: "string" if n == "sex" else "numeric" for n in diabetes.feature_names}
    assert table.columns["sex"].dtype == object and set(table.columns["sex"]) == {"female", "male"}
    assert all(type(v) is str for v in table.columns["sex"])
    assert np.array_equal(table.columns["sex"] == "male", diabetes.data[:, 1] == 2)
    bmi = table.columns["bmi"]
    assert bmi.dtype == np.float64 and tuple(np.flatnonzero(np.isnan(bmi))) == MISSING_BMI
    present = np.ones(442, bool)
    present[list(MISSING_BMI)] = False
    assert np.array_equal(bmi[present], diabetes.data[present, 2])
    assert np.array_equal(table.columns["s5"], diabetes.data[:, 8])
    assert table.target.dtype == np.float32 and table.target.shape == (442, 1)
    assert np.array_equal(table.target[:, 0], diabetes.target.astype(np.float32))
    assert (table.task, table.labels, table.label_columns, table.rows) == ("regression", ("y",), ("y",), 442)
    assert table.source == str(diabetes_csv)
    assert table.notes == ("column 'bmi': 7 of 442 cells missing (kept, the model imputes them)",)
    assert table.describe() == "442 rows; 10 columns: 9 numeric, 1 string; target 'y' (regression)"
    assert table.kind_counts() == {"numeric": 9, "string": 1}


def test_semicolon_tab_and_pipe_files_are_read_without_naming_the_delimiter(tmp_path):
    columns = {"a": [1.5, 2.5, 3.25], "b": ["x", "y z", "w"], "y": ["p", "q"]}
    read = [read_table(small(tmp_path, name, delimiter=d, **columns), "y", None)
            for name, d in (("comma.csv", ","), ("semi.csv", ";"), ("tab.tsv", "\t"), ("pipe.txt", "|"))]
    for table in read:
        assert list(table.columns) == ["a", "b"] and table.kinds == {"a": "numeric", "b": "string"}
        assert table.columns["b"][1] == "y z" and table.columns["a"][2] == 3.25
    assert len({fingerprint_table(table) for table in read}) == 1


def test_a_given_delimiter_is_used_as_given(tmp_path):
    path = small(tmp_path, delimiter=";", a=[1, 2, 3], y=["p", "q"])
    assert list(read_table(path, "y", None, delimiter=";").columns) == ["a"]
    assert refusal(read_table, path, "y", None, delimiter=",") == (
        f"{path} has no column 'y' (columns: a;y); name the label column with --label-column "
        "(read with delimiter ','; pass delimiter= if the file uses another)")


def test_null_spellings_are_missing_values_not_words(tmp_path):
    spellings = list(tables.NULL_SPELLINGS) + [" NA ", '""']
    path = small(tmp_path, rows=44, x=[*spellings, *range(1, 34)], y=["p", "q"])
    table = read_table(path, "y", None)
    assert table.kinds == {"x": "numeric"}
    assert tuple(np.flatnonzero(np.isnan(table.columns["x"]))) == tuple(range(len(spellings)))


def test_surrounding_spaces_are_no_part_of_a_value(tmp_path):
    path = small(tmp_path, a=[" 1.5", "2 "], b=[" red", "blue "], y=["p", "q"])
    table = read_table(path, "y", None)
    assert table.kinds == {"a": "numeric", "b": "string"}
    assert table.columns["a"][:2].tolist() == [1.5, 2.0] and table.columns["b"][:2].tolist() == ["red", "blue"]


def test_a_parquet_file_and_the_csv_of_its_values_read_to_equal_tables(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=n).round(3)
    x[[4, 9]] = np.nan
    code = np.arange(n) % 3
    colour = ["red", "green", None, "blue"] * (n // 4)
    flag = [True, False, False] * (n // 3)
    y = np.array(["cat", "dog", "eel"])[np.arange(n) % 3]
    pq.write_table(pa.table({
        "x": x, "code": pa.array(code, pa.int32()),
        "colour": pa.array(colour).dictionary_encode(), "flag": flag, "y": y}), tmp_path / "t.parquet")
    lines = [["x", "code", "colour", "flag", "y"]] + [
        ["" if np.isnan(a) else repr(float(a)), c, s or "", int(f), t]  # a bool column reads as 1/0
        for a, c, s, f, t in zip(x, code, colour, flag, y)]
    from_parquet = read_table(tmp_path / "t.parquet", ["y"], None)
    from_csv = read_table(write(tmp_path / "t.csv", lines), ["y"], None)
    assert from_parquet.kinds == {"x": "numeric", "code": "integer", "colour": "string", "flag": "integer"}
    assert from_parquet.columns["colour"][2] == "" and set(from_parquet.columns["flag"]) == {0.0, 1.0}
    assert fingerprint_table(from_parquet) == fingerprint_table(from_csv)
    assert from_parquet.notes == (
        "column 'x': 2 of 60 cells missing (kept, the model imputes them)",
        "column 'colour': 15 of 60 cells missing (kept as the empty string)",
        "column 'flag': true/false read as 1/0")


def test_a_parquet_index_saved_by_pandas_is_not_read(tmp_path):
    schema = pa.schema([("__index_level_0__", pa.int64()), ("a", pa.float64()), ("y", pa.string())],
                       metadata={b"pandas": json.dumps({"index_columns": ["__index_level_0__"]}).encode()})
    data = pa.table({"__index_level_0__": list(range(20)), "a": [float(i) for i in range(20)],
                     "y": ["p", "q"] * 10}, schema=schema)
    pq.write_table(data, tmp_path / "t.pq")
    table = read_table(tmp_path / "t.pq", "y", None)
    assert list(table.columns) == ["a"]
    assert table.notes[0] == "column '__index_level_0__' is the index pandas saved with the table: not read"


# Kinds


@pytest.mark.parametrize(("distinct", "present", "codes"), [
    (10, 200, True), (11, 220, False), (10, 199, False), (2, 40, True), (2, 39, False), (1, 20, True)])
def test_looks_like_codes_takes_few_values_each_repeated_about_20_times(distinct, present, codes):
    assert looks_like_codes(distinct, present) is codes


def test_kinds_are_inferred_from_the_values(tmp_path):
    path = small(tmp_path, rows=80, code=[0, 1, 2, 3], count=list(range(80)), half=[0.5, 1.5],
                 word=["a", "b"], y=["p", "q"])
    table = read_table(path, "y", None)
    assert table.kinds == {"code": "integer", "count": "numeric", "half": "numeric", "word": "string"}
    assert table.columns["code"].dtype == np.float64 and table.columns["code"][:5].tolist() == [0, 1, 2, 3, 0]


def test_a_column_of_numbers_with_a_few_words_is_a_string_category_with_a_note(tmp_path):
    path = small(tmp_path, rows=20, x=["1.5", "2", "3", "9 kg", "4", "5", "6", "7", "8", "9"], y=["p", "q"])
    table = read_table(path, "y", None)
    assert table.kinds == {"x": "string"} and table.columns["x"][3] == "9 kg"
    assert table.notes[-1] == ("column 'x': 2 of 20 values are not numbers (the first '9 kg' at line 5), so "
                               "it is read as a string category; fix those cells, or list it in numeric to make them errors")


def test_overrides_categorical_numeric_and_ignore(tmp_path):
    path = small(tmp_path, rows=80, id=list(range(80)), code=[0, 1, 2, 3], dose=["0.5", "1.0", "1.50"],
                 age=list(range(30, 50)), y=["p", "q"])
    table = read_table(path, "y", None, categorical=["dose", "age"], numeric=["code"], ignore=["id"])
    assert table.kinds == {"code": "numeric", "dose": "string", "age": "integer"}
    assert table.columns["dose"][:3].tolist() == ["0.5", "1.0", "1.50"]  # as written
    assert table.columns["age"][:2].tolist() == [30.0, 31.0]


def test_a_word_in_a_numeric_column_names_its_line_after_a_quoted_line_break(tmp_path):
    lines = ["a,note,y"] + [f'{i},"two\nlines",p' if i == 2 else f"{i},n,q" for i in range(12)]
    lines[8] = "7,n,forty"
    lines[9] = "8,n,p"
    lines[10] = "9 kg,n,q"
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n\n")
    assert refusal(read_table, path, "y", None, numeric=["a"]) == (
        f"{path}, line 12: column 'a' holds '9 kg', not a number; fix the cell, leave it empty for a "
        "missing value, or take 'a' out of numeric")


def test_names_the_options_give_must_be_columns(tmp_path):
    path = small(tmp_path, a=[1, 2], y=["p", "q"])
    assert refusal(read_table, path, "y", None, categorical=["b"], ignore=["c"]) == (
        f"{path} has no column 'b' (in categorical), 'c' (in ignore) (columns: a, y)")
    assert refusal(read_table, path, "y", None, numeric=["a"], categorical=["a"]) == (
        f"{path}: 'a' is in both categorical and numeric; keep it in one")
    assert refusal(read_table, path, "y", None, ignore=["y"]) == (
        f"{path}: 'y' is a label column; it cannot also be in ignore")


# Targets


def test_classification_classes_are_sorted_and_numbers_shown_as_written(tmp_path):
    path = small(tmp_path, rows=30, a=[1.0], y=["10", "2", "3.0", "2.5"])
    table = read_table(path, "y", "classification")
    assert table.labels == ("2", "2.5", "3", "10")
    assert table.target.dtype == np.int64 and table.target[:4].tolist() == [3, 0, 2, 1]
    words = read_table(small(tmp_path, "w.csv", a=[0.5], y=["eel", "cat", "dog"]), "y", None)
    assert words.labels == ("cat", "dog", "eel") and words.target[:3].tolist() == [2, 0, 1]
    assert words.describe() == "40 rows; 1 column: 1 numeric; target 'y' (classification, 3 classes)"


def test_one_class_is_refused(tmp_path):
    path = small(tmp_path, a=[1.0], y=["only"])
    assert refusal(read_table, path, "y", None) == (
        f"{path}: label 'y' holds one value ('only'); a classifier needs at least 2")


def test_two_classes_are_binary_with_a_note(tmp_path):
    path = small(tmp_path, a=[1.0], y=["yes", "no", "no"])
    table = read_table(path, "y", None)
    assert (table.task, table.labels) == ("binary", ("no", "yes"))
    assert table.target.dtype == np.int64 and table.target[:3].tolist() == [1, 0, 0]
    assert table.notes == ("2 classes in 'y': trained as binary; --task classification to keep softmax",)
    kept = read_table(path, "y", "classification")
    assert (kept.task, kept.labels, kept.notes) == ("classification", ("no", "yes"), ())


@pytest.mark.parametrize(("values", "order"), [
    (["1", "0"], ("0", "1")), (["True", "False"], ("False", "True")), (["Yes", "no"], ("no", "Yes")),
    (["dog", "cat"], ("cat", "dog"))])
def test_binary_labels_are_negative_then_positive(tmp_path, values, order):
    table = read_table(small(tmp_path, a=[1.0], y=values), "y", "binary")
    assert table.labels == order and table.target[0] == order.index(values[0])


def test_binary_refuses_three_values(tmp_path):
    path = small(tmp_path, a=[1.0], y=["a", "b", "c"])
    assert refusal(read_table, path, "y", "binary") == (
        f"{path}: binary needs exactly 2 values in label 'y', it holds 3 (a, b, c); use --task classification")


def test_several_0_1_label_columns_are_multilabel(tmp_path):
    path = small(tmp_path, a=[0.5, 1.5], red=[1, 0], green=["true", "False", "TRUE"], blue=["no", "yes"])
    table = read_table(path, ["red", "green", "blue"], None)
    assert (table.task, table.labels, list(table.columns)) == ("multilabel", ("red", "green", "blue"), ["a"])
    assert table.target.dtype == np.float32 and table.target.shape == (40, 3)
    assert table.target[:3].tolist() == [[1, 1, 0], [0, 0, 1], [1, 1, 0]]
    assert table.describe() == "40 rows; 1 column: 1 numeric; targets 'red', 'green', 'blue' (multilabel)"


def test_multilabel_refuses_another_value_naming_column_and_line(tmp_path):
    path = small(tmp_path, a=[1.0], red=[1, 0], green=[0, 1, 0, 1, 2])
    assert refusal(read_table, path, ["red", "green"], "multilabel") == (
        f"{path}, line 6: label 'green' holds '2'; multilabel labels are 0/1, true/false or yes/no")
    assert refusal(read_table, path, ["red", "green"], None) == (
        f"{path}: several label columns and no task, and 'green' holds '2' (line 6), not 0/1; name the task: "
        "--task regression for numbers, --task multilabel for 0/1 columns")
    assert refusal(read_table, path, ["red"], "multilabel") == (
        f"{path}: multilabel takes two or more label columns, got 'red'; one 0/1 column is --task binary")


def test_regression_with_several_targets(tmp_path):
    path = small(tmp_path, a=[1.0, 2.0], u=[0.5, 1.5, 2.5], v=[-1, 1e3])
    table = read_table(path, ["u", "v"], "regression")
    assert table.target.dtype == np.float32 and table.target[:2].tolist() == [[0.5, -1], [1.5, 1000]]
    assert table.labels == ("u", "v")
    bad = small(tmp_path, "bad.csv", a=[1.0], u=[0.5, "high"])
    assert refusal(read_table, bad, "u", "regression") == (
        f"{bad}, line 3: column 'u' holds 'high', not a number; regression labels are numbers")


def test_rows_without_a_label_are_dropped_with_a_note(tmp_path):
    path = small(tmp_path, rows=30, a=list(range(30)), y=["p", "q", "p", "", "q", "NA"])
    table = read_table(path, "y", "classification")
    assert table.rows == 20 and 3.0 not in table.columns["a"] and 5.0 not in table.columns["a"]
    assert table.notes == ("10 of 30 rows dropped: no value in label 'y' (the first at line 5)",)
    few = small(tmp_path, "few.csv", rows=27, a=[1.0], y=["p", "", "", "q", "", ""])
    assert refusal(read_table, few, "y", None) == (
        f"{few}: 9 rows have a value in label 'y'; at least 10 are needed to train, validate and test")


def test_many_numbers_without_a_task_are_refused_until_the_task_is_said(tmp_path):
    path = small(tmp_path, rows=40, a=[1.0], y=list(range(12)))
    assert refusal(read_table, path, "y", None) == (
        f"{path}: label 'y' holds 12 distinct numbers; say what to predict: --task regression for the "
        "number, --task classification for 12 classes")
    table = read_table(path, "y", "classification")
    assert table.task == "classification" and len(table.labels) == 12 and table.notes == ()
    assert read_table(path, "y", "regression").task == "regression"
    ten = read_table(small(tmp_path, "ten.csv", rows=40, a=[1.0], y=list(range(10))), "y", None)
    assert ten.task == "classification" and len(ten.labels) == 10


# Refusals


def test_file_problems_are_refused_with_what_to_change(tmp_path):
    assert refusal(read_table, tmp_path / "none.csv", "y", None) == f"data file {tmp_path / 'none.csv'} does not exist"
    odd = tmp_path / "t.xlsx"
    odd.write_bytes(b"PK")
    assert refusal(read_table, odd, "y", None) == (
        f"{odd}: a table file ends in .csv, .tsv, .txt, .parquet, .pq, not '.xlsx'; rename it to say what it holds")
    garbled = tmp_path / "g.parquet"
    garbled.write_bytes(b"not parquet at all" * 10)
    assert refusal(read_table, garbled, "y", None) == (
        f"{garbled} is not a readable Parquet file: Parquet magic bytes not found in footer. Either the file "
        "is corrupted or this is not a parquet file.")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    assert refusal(read_table, empty, "y", None) == f"{empty} is empty; it needs a header row naming the columns"
    header = write(tmp_path / "h.csv", [["a", "y"]])
    assert refusal(read_table, header, "y", None) == f"{header} has a header but no rows"


def test_a_ragged_line_is_named_by_its_line_number(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a,b,y\n1,"x\ny",p\n\n2,z,q\n3,q\n4,w,p\n')
    assert refusal(read_table, path, "y", None) == (
        f"{path}, line 6: 2 fields, the header has 3; fix the line, or quote a field that holds ','")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"a,b,y\n1,caf\xc3\xa9,p\n2,caf\xe9,q\n")
    assert refusal(read_table, path, "y", None) == (
        f"{path}, line 3: byte 0xe9 is not UTF-8; save the file as UTF-8 text")


def test_label_and_feature_columns_that_cannot_be(tmp_path):
    path = small(tmp_path, id=[1, 2], a=[1, 2], y=["p", "q"])
    assert refusal(read_table, path, "label", None) == (
        f"{path} has no column 'label' (columns: id, a, y); name the label column with --label-column "
        "(read with delimiter ','; pass delimiter= if the file uses another)")
    assert refusal(read_table, path, "y", None, ignore=["id", "a"]) == (
        f"{path}: no feature columns left besides the label column(s) 'y' (ignored: a, id); "
        "a model needs at least one")
    hollow = small(tmp_path, "hollow.csv", a=[1], notes=["", "NA"], y=["p", "q"])
    assert refusal(read_table, hollow, "y", None) == f"{hollow}: column 'notes' has no value in any row; add it to ignore"


def test_the_header_must_name_every_column_once(tmp_path):
    twice = write(tmp_path / "twice.csv", [["a", "a", "y"], [1, 2, "p"]])
    assert refusal(read_table, twice, "y", None) == f"{twice}: the header names column 'a' twice; rename one"
    nameless = write(tmp_path / "nameless.csv", [["", "a", "y"], [0, 2, "p"]])
    assert refusal(read_table, nameless, "y", None) == (
        f"{nameless}: column 1 has no name in the header (a saved index?); give it a name, and add it to "
        "ignore if it is no feature")


def test_arguments_are_checked(tmp_path):
    path = small(tmp_path, a=[1.0], y=["p", "q"])
    assert refusal(read_table, path, "y", "ranking") == (
        f"{path}: unknown task 'ranking'; use one of classification, binary, multilabel, regression, or none "
        "to infer it")
    assert refusal(read_table, path, ["y", "a"], "binary") == (
        f"{path}: binary takes one label column, got 2 ('y', 'a'); --task multilabel or regression takes several")


def test_files_larger_than_the_limit_are_refused_before_reading(tmp_path, monkeypatch):
    path = small(tmp_path, rows=400, a=[1.0], y=["p", "q"])
    pq.write_table(pa.table({"a": np.zeros(5000), "y": ["p"] * 5000}), tmp_path / "t.parquet")
    monkeypatch.setattr(tables, "MAX_TABLE_BYTES", 2048)
    assert path.stat().st_size > 2048 > (tmp_path / "t.parquet").stat().st_size
    assert re.fullmatch(
        re.escape(str(path)) + r" is 2\.\d+e-06 GiB on disk; tables of up to 1\.91e-06 GiB are read "
        r"\(MAX_TABLE_BYTES in training/tables\.py\): sample the rows or drop columns first",
        refusal(read_table, path, "y", None))
    # Parquet is compressed: what counts is the size it expands to.
    assert re.fullmatch(
        re.escape(str(tmp_path / "t.parquet")) + r" takes at least 7\.45e-05 GiB in memory; tables of up to "
        r"1\.91e-06 GiB are read .*", refusal(read_table, tmp_path / "t.parquet", "y", None))


def test_a_nested_parquet_column_is_refused(tmp_path):
    pq.write_table(pa.table({"a": [[1, 2]] * 12, "y": ["p", "q"] * 6}), tmp_path / "t.parquet")
    assert refusal(read_table, tmp_path / "t.parquet", "y", None) == (
        f"{tmp_path / 't.parquet'}: column 'a' holds list<element: int64> values, which are neither numbers "
        "nor text; add it to ignore")


# Splits and fingerprints


def test_splits_are_stratified_sorted_and_deterministic(tmp_path):
    path = small(tmp_path, rows=100, row=list(range(100)), y=["a", "a", "a", "b", "c"])
    table = read_table(path, "y", None)
    train, val, test = split_table(table, seed=3)
    assert (train.rows, val.rows, test.rows) == (65, 15, 20)
    rows = np.concatenate([part.columns["row"] for part in (train, val, test)])
    assert sorted(rows) == list(range(100))
    for part in (train, val, test):
        assert np.all(np.diff(part.columns["row"]) > 0)
        counts = np.bincount(part.target, minlength=3) / part.rows
        assert np.allclose(counts, [0.6, 0.2, 0.2], atol=0.05)
    again = split_table(table, seed=3)
    assert all(fingerprint_table(a) == fingerprint_table(b) for a, b in zip(again, (train, val, test)))
    other = split_table(table, seed=4)
    assert fingerprint_table(other[0]) != fingerprint_table(train)


def test_a_class_under_3_rows_cannot_be_split(tmp_path):
    path = small(tmp_path, rows=22, a=list(range(22)), y=["a"] * 10 + ["b"] * 10 + ["rare", "rare"])
    assert refusal(split_table, read_table(path, "y", None), seed=0) == (
        f"{path}: class 'rare' has 2 row(s); every class needs at least 3 to fill train, validation and test")


def test_regression_splits_are_shuffled_not_stratified(tmp_path):
    path = small(tmp_path, rows=40, row=list(range(40)), y=list(range(40)))
    train, val, test = split_table(read_table(path, "y", "regression"), seed=0)
    assert (train.rows, val.rows, test.rows) == (26, 6, 8)
    assert np.array_equal(train.target[:, 0], train.columns["row"])  # rows stay whole
    assert sorted(np.concatenate([train.columns["row"], val.columns["row"], test.columns["row"]])) == list(range(40))


def test_the_fingerprint_changes_with_any_value(tmp_path):
    def digest(**columns):
        return fingerprint_table(read_table(small(tmp_path, **columns), "y", None))

    base = dict(a=[1.5, 2.5], s=["ab", "c"], y=["p", "q"])
    assert digest(**base) == digest(**base)
    assert digest(**base) != digest(**{**base, "a": [1.5, 2.25]})
    assert digest(**base) != digest(**{**base, "s": ["a", "bc"]})  # the same letters, other values
    assert digest(**base) != digest(**{**base, "y": ["p", "r"]})
    assert digest(**base) != digest(**{**base, "a": [1.5, ""]})


def test_show_number_writes_whole_numbers_without_a_point():
    assert [show_number(v) for v in (3.0, -0.0, 0.1, 2.5e20, float("inf"))] == ["3", "0", "0.1", "2.5e+20", "inf"]


def test_a_byte_order_mark_is_no_part_of_the_first_name(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffid;a;y\n".encode() + "".join(f"{i};{i / 2};{'pq'[i % 2]}\n" for i in range(20)).encode())
    table = read_table(path, "y", None, ignore=["id"])
    assert list(table.columns) == ["a"] and table.columns["a"][3] == 1.5


# Cells the csv module, infinity and Parquet's booleans


def test_a_line_number_is_found_past_a_cell_longer_than_the_csv_modules_limit(tmp_path):
    import csv

    long = "word " * 40_000  # 200,000 characters: pyarrow reads it, csv's default limit is 131,072
    lines = ["a,note,y"] + [f"{i},{long if i == 1 else 'n'},{'pq'[i % 2]}" for i in range(30)]
    lines[6] = "5,n,"
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    limit = csv.field_size_limit()
    table = read_table(path, "y", None)
    assert table.notes[0] == "1 of 30 rows dropped: no value in label 'y' (the first at line 7)"
    assert csv.field_size_limit() == limit  # raised for the pass only


def test_a_line_that_cannot_be_found_is_named_by_its_data_row(tmp_path, monkeypatch):
    import csv

    path = small(tmp_path, rows=30, a=list(range(30)), y=["p", "q", ""])

    def unreadable(*args):
        raise csv.Error("field larger than field limit (131072)")
        yield

    monkeypatch.setattr(tables, "_records", unreadable)
    assert read_table(path, "y", None).notes[0] == "10 of 30 rows dropped: no value in label 'y' (the first at data row 3)"


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinity_in_a_parquet_float_column_is_refused_naming_the_row(tmp_path, value):
    x = [0.5 * i for i in range(20)]
    x[3] = value
    pq.write_table(pa.table({"x": x, "y": ["p", "q"] * 10}), tmp_path / "t.parquet")
    assert refusal(read_table, tmp_path / "t.parquet", "y", None) == (
        f"{tmp_path / 't.parquet'}, row 4: column 'x' holds {show_number(value)!r}; a number must be finite: "
        "replace it or leave the column out with --ignore-columns")
    pq.write_table(pa.table({"x": x, "z": [1.0] * 20, "y": ["p", "q"] * 10}), tmp_path / "u.parquet")
    assert list(read_table(tmp_path / "u.parquet", "y", None, ignore=["x"]).columns) == ["z"]


@pytest.mark.parametrize("spelling", ["inf", "-inf", "+Infinity", "1e999", "-1e999"])
def test_infinity_in_a_csv_column_of_numbers_is_refused_naming_the_line(tmp_path, spelling):
    path = small(tmp_path, rows=20, x=["1.5", "2", "", spelling, "4", "5"], y=["p", "q"])
    assert refusal(read_table, path, "y", None) == (
        f"{path}, line 5: column 'x' holds {spelling!r}; a number must be finite: replace it or leave the "
        "column out with --ignore-columns")
    assert "holds 'inf'; a number must be finite" in refusal(
        read_table, small(tmp_path, rows=20, x=["1", "inf"], y=["p", "q"]), "y", None, numeric=["x"])


def test_inf_among_words_or_in_a_named_category_is_a_value(tmp_path):
    words = small(tmp_path, rows=40, depth=["shallow", "deep", "inf"], y=["p", "q"])
    assert read_table(words, "y", None).kinds == {"depth": "string"}
    codes = small(tmp_path, "codes.csv", rows=40, depth=["1", "2", "inf"], y=["p", "q"])
    table = read_table(codes, "y", None, categorical=["depth"])
    assert table.kinds == {"depth": "string"} and table.columns["depth"][:3].tolist() == ["1", "2", "inf"]


def test_a_parquet_bool_column_is_an_integer_category_of_0_and_1(tmp_path):
    flag = [True, False, None, True] * 5
    pq.write_table(pa.table({"flag": pa.array(flag, pa.bool_()), "y": ["p", "q"] * 10}), tmp_path / "t.parquet")
    table = read_table(tmp_path / "t.parquet", "y", None)
    assert table.kinds == {"flag": "integer"} and table.columns["flag"].dtype == np.float64
    assert np.array_equal(table.columns["flag"][:4], [1.0, 0.0, np.nan, 1.0], equal_nan=True)
    assert "column 'flag': true/false read as 1/0" in table.notes
    assert "column 'flag': 5 of 20 cells missing (kept, the model imputes them)" in table.notes
    assert read_table(tmp_path / "t.parquet", "y", None, numeric=["flag"]).kinds == {"flag": "numeric"}


def test_a_parquet_bool_label_keeps_its_classes_false_and_true(tmp_path):
    pq.write_table(pa.table({"a": [float(i) for i in range(20)], "y": [False, True] * 10}), tmp_path / "t.parquet")
    table = read_table(tmp_path / "t.parquet", "y", None)
    assert (table.task, table.labels) == ("binary", ("false", "true"))
    assert table.target[:4].tolist() == [0, 1, 0, 1]
