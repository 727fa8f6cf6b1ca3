"""Data sources, splits and fingerprints (no TF)."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import (
    DataOptions,
    DataError,
    DigitsSource,
    NpzSource,
    fingerprint,
    normalization_stats,
    open_source,
    split,
)


def blobs(n=60, classes=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return rng.normal(size=(n, d)).astype("float32") + y[:, None], y


def test_digits_are_raw_8x8x1_images():
    data = DigitsSource().load()
    assert data.x.shape == (1797, 8, 8, 1) and data.input_shape == (8, 8, 1)
    assert data.x.min() == 0 and data.x.max() == 16
    assert data.classes == tuple(str(i) for i in range(10))


def test_npz_with_string_labels_maps_them_to_sorted_classes(tmp_path):
    x, y = blobs()
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    np.savez(tmp_path / "d.npz", x=x, y=names)
    data = NpzSource(tmp_path / "d.npz").load()
    assert data.classes == ("setosa", "versicolor", "virginica")
    assert np.array_equal(data.y, y)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x=np.zeros((6, 2))), "no array 'y'"),
        (dict(x=np.zeros((6, 2)), y=np.zeros(5)), "x has 6 rows but y has 5"),
        (dict(x=np.zeros((6, 2)), y=np.zeros(6)), "1 class"),
        (dict(x=np.array([[np.nan, 1]] * 6), y=np.arange(6) % 2), "NaN or infinite values .first in row 0"),
        (dict(x=np.zeros(6), y=np.arange(6) % 2), "one row per example"),
        (dict(x=np.zeros((6, 2)), y=np.arange(6) % 2, classes=np.array(["a"])), "outside 0..0"),
    ],
)
def test_bad_npz_files_are_refused_with_reason(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        NpzSource(tmp_path / "d.npz").load()


def test_missing_or_unreadable_files_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        NpzSource(tmp_path / "absent.npz").load()
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        NpzSource(tmp_path / "bad.npz").load()
    with pytest.raises(DataError, match="unknown data source"):
        open_source("mnist")


def test_split_is_deterministic_disjoint_and_stratified(tmp_path):
    x, y = blobs(n=90)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = NpzSource(tmp_path / "d.npz").load()
    a, b = split(data, seed=3), split(data, seed=3)
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.train.y, b.train.y)
    assert not np.array_equal(split(data, seed=4).test.x, a.test.x)
    assert len(a.train.y) + len(a.val.y) + len(a.test.y) == len(data.y)
    rows = lambda d: {r.tobytes() for r in d.x}  # noqa: E731  (blob rows are all distinct)
    assert not rows(a.train) & rows(a.test) and not rows(a.train) & rows(a.val) and not rows(a.val) & rows(a.test)
    for part in (a.train, a.val, a.test):
        assert set(np.unique(part.y)) == {0, 1, 2}


def test_split_refuses_classes_too_small_to_stratify(tmp_path):
    x, y = blobs(n=20)
    y[:] = 0
    y[:2] = 1
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match="class '1' has 2 row"):
        split(NpzSource(tmp_path / "d.npz").load(), seed=0)


def test_fingerprint_changes_with_any_value():
    data = DigitsSource().load()
    same = DigitsSource().load()
    assert fingerprint(data) == fingerprint(same)
    data.x[0, 0, 0, 0] += 1
    assert fingerprint(data) != fingerprint(same)


def test_normalization_stats_per_channel_and_constant_features():
    x = np.stack([np.zeros(5), np.arange(5.0)], axis=1)
    mean, var = normalization_stats(x)
    np.testing.assert_allclose(mean, [0.0, 2.0])
    np.testing.assert_allclose(var, [1.0, 2.0])  # constant feature: variance 1, not 0


def test_image_folders_load_in_a_stable_order_with_raw_pixels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    options = DataOptions(image_size=(8, 8), color_mode="grayscale")
    first = open_source(str(tmp_path / "imgs"), options).load()
    again = open_source(str(tmp_path / "imgs"), options).load()
    assert first.x.shape == (8, 8, 8, 1) and first.classes == ("cat", "dog")
    assert first.x.max() > 1.0  # raw 0..255, not rescaled
    assert np.array_equal(first.x, again.x) and list(first.y) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert fingerprint(first) == fingerprint(again)


def test_a_broken_image_is_named_in_one_line_and_skipped_when_asked(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    good = open_source(str(tmp_path / "imgs"), DataOptions(image_size=(6, 6))).load()
    (tmp_path / "imgs" / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a cut download
    with pytest.raises(DataError) as refused:
        open_source(str(tmp_path / "imgs"), DataOptions(image_size=(6, 6))).load()
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'imgs' / 'dog' / '2.png'} is not an image TensorFlow can decode (")
    assert message.endswith("; fix or remove it, or pass --skip-unreadable to leave such files out")
    assert "\n" not in message
    kept = open_source(str(tmp_path / "imgs"), DataOptions(image_size=(6, 6), skip_unreadable=True)).load()
    assert kept.source == str(tmp_path / "imgs") and list(kept.y) == [0, 0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(kept.x, np.delete(good.x, 6, axis=0))
    assert (f"[data] left out 1 image file(s) that cannot be decoded, the first {tmp_path / 'imgs' / 'dog' / '2.png'}"
            " (--skip-unreadable)") in capsys.readouterr().out


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(DataError):
        open_source(str(tmp_path / "imgs")).load()
