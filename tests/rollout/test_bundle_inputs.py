"""bundle create's sources and golden inputs: version directories, images, tensor files and their key
mapping, deflated golden samples (and bundles from before, whose golden.npz is stored)."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from daemon import tensor_files
from daemon.rollout import BundleError, bundle, signing
from daemon.rollout.archive import npz_bytes
from daemon.rollout.bundle import open_bundle, read_manifest
from daemon.rollout.make import create
from tests.rollout.forge import forge, members

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"
HELDOUT = DIGITS / "data" / "heldout.npz"
SAMPLES = DIGITS / "samples"
CREATED = "2026-01-02T03:04:05Z"


@pytest.fixture
def digits_dir(tmp_path) -> Path:
    d = tmp_path / "digits"
    (d / "1").mkdir(parents=True)
    for name in ("config.toml", "labels.txt"):
        shutil.copy(DIGITS / name, d / name)
    shutil.copy(DIGITS / "1" / "model.onnx", d / "1" / "model.onnx")
    return d


def _golden(path: Path) -> dict[str, np.ndarray]:
    with tarfile.open(path) as tf, np.load(io.BytesIO(tf.extractfile("golden.npz").read())) as z:
        return {k: z[k] for k in z.files}


# ---- key mapping ---------------------------------------------------------------------------------
def test_key_mapping_by_name_prefix_x_and_single_array():
    a, b = np.zeros((2, 3)), np.ones((2, 3))
    assert tensor_files.map_arrays({"in": a, "other": b}, ["in"], "f")["in"] is a
    assert tensor_files.map_arrays({"input:in": a}, ["in"], "f")["in"] is a
    assert tensor_files.map_arrays({"x": a, "y": b}, ["in"], "f")["in"] is a
    assert tensor_files.map_arrays({"whatever": b}, ["in"], "f")["in"] is b
    with pytest.raises(tensor_files.SampleFileError, match=r"holds 'p', 'q', but the model's inputs are in"):
        tensor_files.map_arrays({"p": a, "q": b}, ["in"], "f")
    with pytest.raises(tensor_files.SampleFileError, match="inputs are a, b"):
        tensor_files.map_arrays({"a": a, "x": b}, ["a", "b"], "f")


def test_fit_shape_reshapes_only_when_the_sample_size_matches():
    x = np.zeros((5, 8, 8), np.uint8)
    assert tensor_files.fit_shape(x, [1, 8, 8], "input", "f").shape == (5, 1, 8, 8)
    assert tensor_files.fit_shape(x, [None, 8, 8], "input", "f") is x
    with pytest.raises(tensor_files.SampleFileError, match=r"samples of shape \[8, 8\], the model takes \[3, 8, 8\]"):
        tensor_files.fit_shape(x, [3, 8, 8], "input", "f")


# ---- sources and versions ------------------------------------------------------------------------
def test_version_is_the_shipped_version_and_the_source_a_path(digits_dir, tmp_path):
    (digits_dir / "2").mkdir()
    shutil.copy(digits_dir / "1" / "model.onnx", digits_dir / "2" / "model.onnx")
    m = create(digits_dir / "1", tmp_path / "a.tegrad", version=7, golden_inputs=HELDOUT, created=CREATED)
    assert (m.model, m.version) == ("digits", 7)
    assert create(digits_dir, tmp_path / "b.tegrad", golden_inputs=HELDOUT, created=CREATED).version == 2
    assert create(digits_dir / "1", tmp_path / "c.tegrad", golden_inputs=HELDOUT, created=CREATED).version == 1
    # the deprecated --model-version: source folder and shipped version in one
    m = create(digits_dir, tmp_path / "d.tegrad", version=1, source_version=1, golden_inputs=HELDOUT, created=CREATED)
    assert m.version == 1
    with pytest.raises(BundleError, match="cannot find the model version 5"):
        create(digits_dir, tmp_path / "e.tegrad", source_version=5, golden_inputs=HELDOUT, created=CREATED)


def test_a_version_directory_config_wins(digits_dir, tmp_path):
    text = (digits_dir / "config.toml").read_text().replace("max_batch = 64", "max_batch = 16")
    (digits_dir / "1" / "config.toml").write_text(text)
    m = create(digits_dir / "1", tmp_path / "a.tegrad", golden_inputs=HELDOUT, created=CREATED)
    assert "max_batch = 16" in m.config


# ---- golden inputs -------------------------------------------------------------------------------
def test_heldout_npz_feeds_x_to_the_only_input(digits_dir, tmp_path):
    out = tmp_path / "a.tegrad"
    create(digits_dir, out, golden_inputs=HELDOUT, golden_scale=1 / 16, golden_count=12, created=CREATED)
    g = _golden(out)
    with np.load(HELDOUT) as z:
        want = (z["x"][:12].astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    np.testing.assert_array_equal(g["input:input"], want)
    assert sorted(g) == ["input:input", "output:logits"]


def test_images_are_preprocessed_with_the_models_preprocess(digits_dir, tmp_path):
    out = tmp_path / "a.tegrad"
    create(digits_dir, out, golden_inputs=[SAMPLES], golden_count=10, created=CREATED)
    g = _golden(out)
    assert g["input:input"].shape == (10, 1, 8, 8) and g["input:input"].dtype == np.float32
    assert 0 <= g["input:input"].min() and g["input:input"].max() <= 1
    # digit-0.png .. digit-9.png, in name order: the FP32 model reads each as its digit
    assert list(g["output:logits"].argmax(1)) == list(range(10))
    one = tmp_path / "b.tegrad"
    create(digits_dir, one, golden_inputs=[SAMPLES / "digit-3.png"], created=CREATED)
    assert _golden(one)["output:logits"].argmax(1).tolist() == [3]


def test_images_need_a_preprocess_section(digits_dir, tmp_path):
    text = (digits_dir / "config.toml").read_text()
    (digits_dir / "config.toml").write_text(text[:text.index("[preprocess]")])
    with pytest.raises(BundleError, match=r"golden inputs are images, but config.toml has no \[preprocess\]"):
        create(digits_dir, tmp_path / "a.tegrad", golden_inputs=[SAMPLES], created=CREATED)


def test_mixed_or_unknown_golden_files_are_refused(digits_dir, tmp_path):
    with pytest.raises(BundleError, match="either images .* or tensor files"):
        create(digits_dir, tmp_path / "a.tegrad", golden_inputs=[SAMPLES, HELDOUT], created=CREATED)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="notes.txt: not an image"):
        create(digits_dir, tmp_path / "a.tegrad", golden_inputs=[tmp_path / "notes.txt"], created=CREATED)
    np.savez(tmp_path / "bad.npz", p=np.zeros((2, 64)), q=np.zeros(2))
    with pytest.raises(BundleError, match="holds 'p', 'q', but the model's inputs are input"):
        create(digits_dir, tmp_path / "a.tegrad", golden_inputs=tmp_path / "bad.npz", created=CREATED)


# ---- compression and older bundles ---------------------------------------------------------------
def test_golden_samples_are_deflated(digits_dir, tmp_path):
    out = tmp_path / "a.tegrad"
    create(digits_dir, out, golden_inputs=HELDOUT, golden_scale=1 / 16, golden_count=256, created=CREATED)
    with tarfile.open(out) as tf:
        data = tf.extractfile("golden.npz").read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        expanded = sum(i.file_size for i in zf.infolist())
    assert len(data) < expanded / 2, (len(data), expanded)
    assert read_manifest(out).manifest.members["golden.npz"].size == len(data)


def test_a_bundle_with_stored_golden_samples_still_opens(digits_dir, tmp_path):
    key, _, _ = signing.generate_keypair(tmp_path / "keys", "k")
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(tmp_path / "keys" / "k.pub", trust / "k.pub")
    new = tmp_path / "new.tegrad"
    create(digits_dir, new, golden_inputs=HELDOUT, created=CREATED)
    items = dict((m.name, d) for m, d in members(new))
    with np.load(io.BytesIO(items["golden.npz"])) as z:
        stored = npz_bytes({k: z[k] for k in z.files})  # as tegrad wrote golden.npz before it was deflated
    old = forge(new, tmp_path / "old.tegrad", key, replace={"golden.npz": stored})
    vb = open_bundle(old, signing.TrustStore(trust))
    with np.load(io.BytesIO(stored)) as z:
        np.testing.assert_array_equal(vb.golden_inputs["input"], z["input:input"])


def test_golden_samples_that_expand_too_far_are_refused(digits_dir, tmp_path, monkeypatch):
    out = tmp_path / "a.tegrad"
    create(digits_dir, out, golden_inputs=HELDOUT, created=CREATED)
    monkeypatch.setattr(bundle, "MAX_GOLDEN_BYTES", 1024)
    with pytest.raises(BundleError, match="golden.npz expands to .* bytes, more than"):
        open_bundle(out, None, allow_unsigned=True)


def test_reference_outputs_match_onnx_runtime_on_the_same_inputs(digits_dir, tmp_path):
    out = tmp_path / "a.tegrad"
    create(digits_dir, out, golden_inputs=[SAMPLES], golden_count=10, created=CREATED)
    g = _golden(out)
    sess = ort.InferenceSession(str(DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": g["input:input"]})[0], g["output:logits"], rtol=1e-5,
                               atol=1e-5)


def test_postprocess_labels_ship_in_the_bundle(digits_dir, tmp_path):
    # A [postprocess] labels file is read at load like an output's: without it the version cannot load.
    text = (digits_dir / "config.toml").read_text().replace('labels = "labels.txt"\n', "")
    (digits_dir / "config.toml").write_text(text + '\n[postprocess]\nkind = "classification"\nlabels = "classes.txt"\n')
    (digits_dir / "labels.txt").rename(digits_dir / "classes.txt")
    out = tmp_path / "a.tegrad"
    create(digits_dir, out, golden_inputs=[HELDOUT], golden_scale=0.0625, created=CREATED)
    with tarfile.open(out) as tf:
        assert tf.extractfile("classes.txt").read() == (digits_dir / "classes.txt").read_bytes()
    (digits_dir / "classes.txt").unlink()
    with pytest.raises(BundleError, match="uses labels 'classes.txt', which was not found"):
        create(digits_dir, tmp_path / "b.tegrad", golden_inputs=[HELDOUT], golden_scale=0.0625, created=CREATED)
