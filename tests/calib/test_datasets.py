"""Calibration data sources: image folders, .npy/.npz files, Python iterables."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from calib.datasets import ImageFolder, IterableSource, NumpyFiles, as_source, batches
from calib.preprocess import PreprocessSpec, load_image, preprocess

SPEC = PreprocessSpec(size=(4, 6), color="RGB", mean=0, std=255)


def _write_images(folder, names):
    rng = np.random.default_rng(0)
    for name in names:
        img = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / name), img)


def test_image_folder_sorted_batched_limited(tmp_path) -> None:
    _write_images(tmp_path, ["c.png", "a.png", "b.bmp", "d.png", "e.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolder(tmp_path, SPEC)
    assert [f.name for f in src.files] == ["a.png", "b.bmp", "c.png", "d.png", "e.png"]
    assert len(src) == 5
    out = list(batches(src, "x", batch_size=2))
    assert [b["x"].shape for b in out] == [(2, 3, 4, 6), (2, 3, 4, 6), (1, 3, 4, 6)]
    expected = preprocess(load_image(tmp_path / "c.png"), SPEC)[0]
    np.testing.assert_array_equal(out[1]["x"][0], expected)
    limited = list(batches(tmp_path, "x", batch_size=2, spec=SPEC, limit=3))
    assert sum(b["x"].shape[0] for b in limited) == 3
    assert as_source(tmp_path, spec=SPEC, limit=3).describe() == {"kind": "images", "path": str(tmp_path),
                                                                   "count": 3}


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path, SPEC)
    with pytest.raises(ValueError, match="preprocessing spec"):
        as_source(tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.jpg"):
        list(batches(ImageFolder(tmp_path, SPEC), "x"))
    with pytest.raises(ValueError, match="input_name"):
        list(batches(ImageFolder(tmp_path, SPEC), None))


def test_npy_streams_slices(tmp_path) -> None:
    data = np.arange(10 * 2 * 3, dtype=np.float32).reshape(10, 2, 3)
    path = tmp_path / "calib.npy"
    np.save(path, data)
    src = NumpyFiles(path)
    assert len(src) == 10
    out = list(batches(src, "input", batch_size=4))
    assert [b["input"].shape[0] for b in out] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in out]), data)
    assert sum(b["input"].shape[0] for b in batches(path, "input", batch_size=3, limit=7)) == 7


def test_npz_feeds_by_input_name(tmp_path) -> None:
    path = tmp_path / "calib.npz"
    a, b = np.ones((5, 2), np.float32), np.zeros((5, 3), np.float32)
    np.savez(path, a=a, b=b)
    out = list(batches(path, batch_size=2))
    assert [sorted(f) for f in out] == [["a", "b"]] * 3
    assert [f["b"].shape for f in out] == [(2, 3), (2, 3), (1, 3)]
    np.savez(tmp_path / "bad.npz", a=a, b=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="disagree"):
        list(batches(tmp_path / "bad.npz"))


def test_iterables_of_samples_dicts_and_batches() -> None:
    samples = [np.full((2,), i, np.float32) for i in range(5)]
    out = list(batches(samples, "x", batch_size=2))
    assert [f["x"].tolist() for f in out] == [[[0, 0], [1, 1]], [[2, 2], [3, 3]], [[4, 4]]]
    dicts = ({"x": s} for s in samples)
    assert [f["x"].shape for f in batches(dicts, batch_size=5)] == [(5, 2)]
    pre_batched = IterableSource([np.zeros((3, 2)), np.ones((3, 2))], batched=True)
    out = list(batches(pre_batched, "x", batch_size=4))
    assert [f["x"].shape[0] for f in out] == [4, 2]
    np.testing.assert_array_equal(out[0]["x"][3], [1, 1])
    assert len(IterableSource(samples, limit=3)) == 3
    assert sum(f["x"].shape[0] for f in batches(IterableSource(samples, limit=3), "x", 2)) == 3
    # A bare array is a stack of samples.
    assert [f["x"].shape for f in batches(np.zeros((3, 2)), "x", 2)] == [(2, 2), (1, 2)]
    with pytest.raises(ValueError, match="input_name"):
        list(batches(samples, None))
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(samples, "x", 0))
    with pytest.raises(ValueError, match="disagree"):
        list(batches([{"x": np.zeros(1)}, {"y": np.zeros(1)}], batch_size=1))
