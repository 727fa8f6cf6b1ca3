"""Text as a data kind: a folder of class sub-folders of `.txt` files and a table's text column,
read (`training.text_folder`, `training.tables`), tokenised inside the members
(`training.features`), and end to end: a folder of texts trained through `ensemble-train`,
served by a real `ensemble-serve`, asked with strings, and answered as the published members
combine.

The texts are docstrings of standard-library packages (each package a class): text that ships
with Python, no download."""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import httpx
import numpy as np
import pytest

from contract.manifest import read_manifest
from tests.server import ServerProcess
from tests.test_train_tables import members_answer
from training import text_folder
from training.cli import EXIT_FAILED, EXIT_OK, main
from training.data import DataError, is_table, is_text_folder, open_source
from training.tables import fingerprint_table, looks_like_text, read_table
from training.text_folder import read_text_folder

PACKAGES = ("email", "asyncio", "unittest")


def docstrings(package: str, count: int) -> list[str]:
    """The first paragraph of the first `count` docstrings of four words or more in a stdlib package."""
    found = []
    for path in sorted((Path(sysconfig.get_paths()["stdlib"]) / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 4:
                    found.append(doc.split("\n\n")[0])
                    if len(found) == count:
                        return found
    return found


def write_folder(root: Path, classes: dict[str, list[str]]) -> Path:
    for label, texts in classes.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (root / label / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# A folder of texts


def test_a_folder_of_class_sub_folders_reads_as_one_text_column_and_a_class_target(tmp_path):
    root = write_folder(tmp_path / "docs", {"b": ["second one", "  spaced out \n"], "a": ["first"] * 8,
                                            "c": ["third"]})
    (root / "a" / "deeper").mkdir()
    (root / "a" / "deeper" / "x.TXT").write_bytes("\ufeffnested and marked".encode())
    (root / "a" / "notes.md").write_text("not a text of the class")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "c.txt").write_text("a hidden folder is no class")
    table = read_text_folder(root)
    assert (table.task, table.labels, table.kinds, table.label_columns) == (
        "classification", ("a", "b", "c"), {"text": "text"}, ("label",))
    assert table.columns["text"].tolist() == ["first"] * 8 + ["nested and marked", "second one", "spaced out",
                                                               "third"]
    assert table.target.tolist() == [0] * 9 + [1, 1, 2]
    assert table.describe() == "12 rows; 1 column: 1 text; target 'label' (classification, 3 classes)"
    assert table.notes == ()


def test_two_classes_are_binary_with_a_note_in_a_known_order(tmp_path):
    root = write_folder(tmp_path / "docs", {"yes": ["good"] * 6, "no": ["bad"] * 6})
    table = read_text_folder(root)
    assert (table.task, table.labels) == ("binary", ("no", "yes"))
    assert table.target.tolist() == [0] * 6 + [1] * 6
    assert table.notes == (f"2 classes in {root}: trained as binary; --task classification to keep softmax",)
    assert read_text_folder(root, "classification").task == "classification"
    assert "binary needs exactly 2 class sub-folders, it has 3" in refusal(
        read_text_folder, write_folder(tmp_path / "three", {c: ["t"] * 5 for c in "abc"}), "binary")
    assert refusal(read_text_folder, root, "regression") == (
        f"{root}: a folder of texts gives each text one class; --task regression needs a table with label columns")


def test_a_file_that_is_not_utf8_is_named_in_one_line(tmp_path):
    root = write_folder(tmp_path / "docs", {"a": ["one"] * 6, "b": ["two"] * 6})
    bad = root / "b" / "latin.txt"
    bad.write_bytes(b"caf\xc3\xa9\ncaf\xe9\n")
    message = refusal(read_text_folder, root)
    assert message == (f"{bad}, line 2: byte 0xe9 is not UTF-8; save the file as UTF-8 text, or pass "
                       "--skip-unreadable to leave such files out")
    assert "\n" not in message


def test_skip_unreadable_leaves_those_files_out_and_says_how_many(tmp_path):
    root = write_folder(tmp_path / "docs", {"a": ["one"] * 6, "b": ["two"] * 6})
    for name in ("x.txt", "y.txt"):
        (root / "b" / name).write_bytes(b"\xff\xfe not utf-8")
    table = read_text_folder(root, skip_unreadable=True)
    assert table.rows == 12
    assert table.notes[0] == (f"2 files skipped, unreadable or not UTF-8 text (--skip-unreadable); "
                              f"the first: {root / 'b' / 'x.txt'}")
    for file in (root / "a").iterdir():
        file.write_bytes(b"\xe9")
    assert refusal(read_text_folder, root, skip_unreadable=True) == (
        f"{root / 'a'}: none of its 6 .txt files is readable UTF-8 text, so class 'a' has no examples; save "
        "them as UTF-8 or move the sub-folder out")


def test_files_and_folders_over_the_limits_are_refused_before_reading(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "docs", {"a": ["one"] * 6, "b": ["two"] * 5 + ["x" * 40]})
    monkeypatch.setattr(text_folder, "MAX_FILE_BYTES", 39)
    assert refusal(read_text_folder, root) == (
        f"{root / 'b' / '005.txt'} is 40 bytes; texts of up to 39 bytes are read (MAX_FILE_BYTES in "
        "training/text_folder.py): split it or leave it out")
    monkeypatch.setattr(text_folder, "MAX_FILE_BYTES", 40)
    monkeypatch.setattr(text_folder, "MAX_FOLDER_BYTES", 72)
    assert refusal(read_text_folder, root) == (
        f"{root} holds 73 bytes of .txt files; up to 72 bytes are read (MAX_FOLDER_BYTES in "
        "training/text_folder.py): sample the files first")
    monkeypatch.setattr(text_folder, "MAX_FOLDER_BYTES", 73)
    assert read_text_folder(root).rows == 12


def test_folders_without_enough_classes_or_texts_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refusal(read_text_folder, empty) == (
        f"{empty} holds no class sub-folders; put each class's .txt files in a sub-folder named after the class")
    root = write_folder(tmp_path / "docs", {"a": ["one"] * 6, "b": ["two"] * 6})
    (root / "c").mkdir()
    (root / "c" / "readme.md").write_text("no text of the class")
    assert refusal(read_text_folder, root) == (
        f"{root / 'c'} holds no .txt files; every class sub-folder needs at least one (or move it out of {root})")
    one = write_folder(tmp_path / "one", {"only": ["text"] * 12})
    assert refusal(read_text_folder, one) == f"{one} has one class sub-folder ('only'); a classifier needs at least 2"
    few = write_folder(tmp_path / "few", {"a": ["t"] * 4, "b": ["u"] * 4})
    assert refusal(read_text_folder, few) == f"{few}: 8 texts; at least 10 are needed to train, validate and test"
    assert refusal(read_text_folder, tmp_path / "nowhere") == f"data folder {tmp_path / 'nowhere'} does not exist"


def test_empty_files_are_the_empty_text_with_a_note(tmp_path):
    root = write_folder(tmp_path / "docs", {"a": ["one"] * 5 + [" \n"], "b": ["two"] * 6})
    table = read_text_folder(root)
    assert table.columns["text"][5] == ""
    assert "column 'text': 1 of 12 files are empty (kept as the empty text)" in table.notes


def test_the_folder_dispatch_tells_texts_from_images(tmp_path):
    texts = write_folder(tmp_path / "texts", {"a": ["one"] * 6, "b": ["two"] * 6})
    assert is_text_folder(str(texts)) and is_table(str(texts))
    assert "is a table or a folder of texts" in refusal(open_source, str(texts))
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "1.png").write_bytes(b"\x89PNG")
    (images / "cat" / "LICENSE.txt").write_text("a licence beside the images")
    assert not is_text_folder(str(images)) and not is_table(str(images))
    assert not is_text_folder(str(texts / "a" / "000.txt")) and not is_text_folder("digits")


def test_hidden_folders_and_files_at_any_depth_are_no_examples(tmp_path):
    root = write_folder(tmp_path / "docs", {"neg": ["bad"] * 6, "pos": ["good"] * 6})
    for hidden in (root / "pos" / ".ipynb_checkpoints", root / "neg" / "deeper" / ".git" / "objects"):
        hidden.mkdir(parents=True)
        (hidden / "000-checkpoint.txt").write_text("a copy of a text: a leak between train and test")
    (root / "pos" / ".draft.txt").write_text("a hidden file")
    (root / "neg" / "deeper" / "kept.txt").write_text("nested, not hidden")
    table = read_text_folder(root)
    assert sorted(table.columns["text"].tolist()) == ["bad"] * 6 + ["good"] * 6 + ["nested, not hidden"]
    only_hidden = tmp_path / "only_hidden"
    for label in ("neg", "pos"):
        (only_hidden / label / ".ipynb_checkpoints").mkdir(parents=True)
        (only_hidden / label / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("hidden")
    assert not is_text_folder(str(only_hidden))
    (root / "pos" / ".thumbnails").mkdir()
    (root / "pos" / ".thumbnails" / "cover.png").write_bytes(b"\x89PNG")
    assert is_text_folder(str(root))  # an image in a hidden folder is no image of the data either


# A table's text column


@pytest.mark.parametrize("distinct,present,chars,words,text", [
    (50, 1000, 30.0, 1.0, True),   # long values, enough of them
    (49, 49, 80.0, 12.0, False),   # too few distinct values to tell text from categories
    (50, 1000, 29.9, 9.0, False),  # shorter, and repeated: categories
    (51, 100, 20.0, 3.0, True),    # more than half distinct, three words each
    (50, 100, 20.0, 3.0, False),   # exactly half distinct
    (60, 100, 20.0, 2.9, False),   # distinct but a word or two: names, ids
])
def test_looks_like_text_takes_long_or_mostly_distinct_phrases(distinct, present, chars, words, text):
    assert looks_like_text(distinct, present, chars, words) is text


def write_reviews(path: Path, rows: int = 120) -> Path:
    """A CSV of a review (distinct sentences), a short id, a long category and a label."""
    rng = np.random.default_rng(3)
    words = docstrings("email", 200)
    lines = ["id,review,plan,y"]
    for i in range(rows):
        review = " ".join(rng.choice(words[i % len(words)].split(), size=6)).replace('"', "'")
        plan = ["the basic plan with monthly billing", "the premium plan with yearly billing"][i % 2]
        lines.append(f'u{i},"{review}",{plan},{"pq"[i % 2]}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_column_of_distinct_phrases_is_text_and_the_kind_can_be_overridden(tmp_path):
    path = write_reviews(tmp_path / "reviews.csv")
    table = read_table(path, "y", None)
    assert table.kinds == {"id": "string", "review": "text", "plan": "string"}
    assert table.kind_counts() == {"string": 2, "text": 1}
    forced = read_table(path, "y", None, text=("plan",), categorical=("review",))
    assert forced.kinds == {"id": "string", "review": "string", "plan": "text"}
    assert forced.columns["plan"][0] == "the basic plan with monthly billing"
    assert fingerprint_table(forced) != fingerprint_table(table)
    assert refusal(read_table, path, "y", None, text=("review",), categorical=("review",)) == (
        f"{path}: 'review' is in both categorical and text; keep it in one")
    assert refusal(read_table, path, "y", None, text=("y",)) == (
        f"{path}: 'y' is a label column; it cannot also be in text")
    assert "has no column 'nope' (in text)" in refusal(read_table, path, "y", None, text=("nope",))


def test_missing_text_is_the_empty_string(tmp_path):
    path = write_reviews(tmp_path / "reviews.csv")
    lines = path.read_text().splitlines()
    lines[3] = "u2,,the basic plan with monthly billing,p"
    path.write_text("\n".join(lines) + "\n")
    table = read_table(path, "y", None)
    assert table.kinds["review"] == "text" and table.columns["review"][2] == ""
    assert "column 'review': 1 of 120 cells missing (kept as the empty string)" in table.notes


def test_the_cli_passes_text_columns_and_names_what_is_wrong(tmp_path, capsys):
    path = write_reviews(tmp_path / "reviews.csv")
    code = main(["--data", str(path), "--label-column", "y", "--text-columns", "nope",
                 "--repository", str(tmp_path / "models"), "--name", "reviews"])
    assert code == EXIT_FAILED
    assert "has no column 'nope' (in text)" in capsys.readouterr().err


# Inside the members


def test_text_statistics_keep_the_most_frequent_words_and_a_bounded_length():
    from training.features import MAX_TEXT_LENGTH, column_stats, text_length

    texts = np.array(["The cat sat.", "the CAT ran", "a dog", ""], dtype=object)
    stats = column_stats("review", "text", texts)
    assert stats.vocabulary[:2] == ("the", "cat") and set(stats.vocabulary) == {"the", "cat", "sat", "ran", "a",
                                                                                   "dog"}
    assert stats.has_missing and stats.length == 3
    assert (stats.spec().dtype, stats.spec().shape, stats.spec().nullable) == ("string", (), True)
    assert text_length(np.array([1000] * 10)) == MAX_TEXT_LENGTH and text_length(np.array([0, 0])) == 1
    assert text_length(np.arange(1, 101)) == 96
    with pytest.raises(DataError, match="column 'review': its training texts hold no words"):
        column_stats("review", "text", np.array(["", "?!"], dtype=object))


def test_the_text_search_space_is_added_only_for_text_and_an_empty_text_is_answered():
    import keras_tuner as kt

    from training.features import as_inputs, column_stats
    from training.heads import Head
    from training.hypermodel import TableHyperModel

    numbers = column_stats("age", "numeric", np.array([30.0, 40.0, np.nan]))
    plain = kt.HyperParameters()
    TableHyperModel([numbers], Head("binary", 2, "y")).build(plain)
    assert sorted(plain.values) == ["dense_layers", "dropout", "learning_rate", "units", "wide"]
    review = column_stats("review", "text", np.array(["a good film", "a bad film", "very good"], dtype=object))
    for encoder in ("mean", "convolution", "bag"):
        hp = kt.HyperParameters()
        hp.Fixed("text_encoder", encoder)
        model = TableHyperModel([numbers, review], Head("binary", 2, "y")).build(hp)
        assert {"text_max_tokens", "text_encoder"} <= set(hp.values)
        assert ("text_embedding" in hp.values) is (encoder != "bag")
        columns = {"age": np.array([np.nan, 35.0]), "review": np.array(["", "never seen words"], dtype=object)}
        out = model.predict(as_inputs(columns, [numbers, review]), verbose=0)
        assert np.all(np.isfinite(out)), encoder


# End to end

# Small tables would be cross-fitted (several models per member); this test checks the plumbing.
FAST = ["--tuner", "random", "--max-trials", "1", "--max-epochs", "2", "--members", "tuned:1,seed:1",
        "--epochs", "4", "--patience", "2", "--no-gate", "--cross-fit", "never"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder of stdlib docstrings (one unreadable file among them) trained and served."""
    root = tmp_path_factory.mktemp("text")
    folder = write_folder(root / "docs", {p: docstrings(p, 50) for p in PACKAGES})
    (folder / "email" / "latin.txt").write_bytes(b"r\xe9sum\xe9")
    code = main(["--data", str(folder), "--repository", str(root / "models"), "--name", "docs",
                 "--skip-unreadable", *FAST])
    assert code == EXIT_OK
    server = ServerProcess(root / "models", env={"ENSEMBLE_LOADER_DUTY_CYCLE": "1"})
    server.start(timeout=400)
    try:
        server.wait_live(1, "docs", timeout=400)
        yield root, server
    finally:
        server.kill()


ASKED = [{"text": "Return the message payload as a string."},
         {"text": "Schedule the coroutine on the event loop."},
         {"text": ""},
         {"text": None},
         {"text": "wörds never seen in training ✓"}]


def test_a_folder_of_texts_is_served_and_answered_as_its_members_combine(served):
    root, server = served
    vdir = root / "models" / "docs" / "1"
    manifest = read_manifest(vdir)
    data = json.loads((vdir / "report.json").read_text())["data"]
    assert data["columns"] == {"text": "text"}
    assert data["notes"] == [f"1 file skipped, unreadable or not UTF-8 text (--skip-unreadable); the first: "
                             f"{root / 'docs' / 'email' / 'latin.txt'}"]
    assert [(s.name, s.dtype, s.shape, s.nullable) for s in manifest.inputs] == [("text", "string", (), True)]
    head = manifest.heads[0]
    assert (head.name, head.task, head.labels) == ("label", "classification", ("asyncio", "email", "unittest"))
    expected = members_answer(vdir, manifest, ASKED)
    reply = httpx.post(f"{server.base}/v1/models/docs:predict", json={"instances": ASKED}, timeout=30)
    assert reply.status_code == 200, reply.text
    got = np.array([row["label"] if isinstance(row, dict) else row for row in reply.json()["predictions"]],
                   dtype=np.float64)
    np.testing.assert_allclose(got.reshape(expected.value.shape), expected.value, rtol=1e-4, atol=1e-4)
