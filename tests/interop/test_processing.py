"""Images in, results out, over gRPC: a classifier with [postprocess] classification and a YOLO
detector with letterbox preprocessing, driven by tritonclient with real JPEG/PNG files."""

from __future__ import annotations

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.interop.conftest import DIGITS, ROOT
from tests.onnx_models import DETECTOR_CONFIG, fixed_detector

CLASSIFIER_POST = """
[postprocess]
kind = "classification"
softmax = true
top_k = 3
labels = "labels.txt"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.interop.conftest import start_server

    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DIGITS, root / "classifier", ignore=shutil.ignore_patterns("data", "README.md"))
    config = root / "classifier" / "config.toml"
    config.write_text(config.read_text() + CLASSIFIER_POST)
    fixed_detector(root / "detector" / "1" / "model.onnx")
    (root / "detector" / "config.toml").write_text(DETECTOR_CONFIG)
    server = start_server(repository=root, state_dir=tmp_path_factory.mktemp("state"))
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def _digit_images(n: int, ext: str) -> tuple[list[bytes], np.ndarray]:
    data = np.load(DIGITS / "data" / "heldout.npz")
    files = []
    for d in data["x"][:n]:
        big = cv2.resize((d.astype(np.int32) * 255 // 16).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
        files.append(cv2.imencode(ext, big, [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else [])[1].tobytes())
    return files, data["y"][:n]


def _send(client, model: str, files: list[bytes]):
    inp = grpcclient.InferInput("image", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=object))
    return client.infer(model, [inp])


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_classifier_takes_images_and_returns_top_k_with_labels(client, ext):
    files, y = _digit_images(24, ext)
    result = _send(client, "classifier", files)
    scores, classes, labels = (result.as_numpy(n) for n in ("scores", "classes", "labels"))
    assert scores.shape == classes.shape == labels.shape == (24, 3)
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all((scores >= 0) & (scores <= 1))
    assert (classes[:, 0] == y).mean() >= 0.9
    assert [row[0].decode() for row in labels] == [str(c) for c in classes[:, 0]]
    meta = client.get_model_metadata("classifier")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("scores", "FP32", [-1, 3]), ("classes", "INT32", [-1, 3]), ("labels", "BYTES", [-1, 3])]


def test_detector_maps_boxes_back_to_the_original_image(client):
    # 128x64 (w x h): letterbox scale 0.5 into 64x64, 16 rows of padding above and below.
    image = np.full((64, 128, 3), 40, np.uint8)
    files = [cv2.imencode(".jpg", image)[1].tobytes(), cv2.imencode(".png", image[:, :64])[1].tobytes()]
    result = _send(client, "detector", files)
    boxes, scores, classes, count = (result.as_numpy(n) for n in ("boxes", "scores", "classes", "count"))
    assert boxes.shape == (2, 5, 4) and list(count) == [2, 2]
    np.testing.assert_allclose(scores[0, :2], [0.9, 0.7], rtol=1e-6)
    assert list(classes[0]) == [0, 1, -1, -1, -1]
    # model box (22, 27, 42, 37) -> x / 0.5, (y - 16) / 0.5; (6, 16, 14, 24) likewise.
    np.testing.assert_allclose(boxes[0, :2], [[44, 22, 84, 42], [12, 0, 28, 16]], atol=1e-3)
    # the 64x64 image needs no letterbox: boxes stay as the model gave them
    np.testing.assert_allclose(boxes[1, :2], [[22, 27, 42, 37], [6, 16, 14, 24]], atol=1e-3)
    assert not boxes[0, 2:].any()


def test_a_corrupt_image_fails_only_its_request(client):
    good, _ = _digit_images(1, ".png")
    with pytest.raises(InferenceServerException) as info:
        _send(client, "classifier", good + [good[0][:20]])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "batch index 1 of 2" in info.value.message()
    assert _send(client, "classifier", good).as_numpy("classes").shape == (1, 3)


def test_cli_infer_sends_an_image_to_the_default_model(tmp_path):
    from tests.interop.conftest import start_server

    files, y = _digit_images(1, ".png")
    path = tmp_path / "digit.png"
    path.write_bytes(files[0])
    server = start_server(state_dir=tmp_path / "state")
    try:
        out = subprocess.run([sys.executable, "-m", "daemon", "infer", "--image", str(path), "-k", "3", "--url", server.url],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        assert server.stop() == 0
    assert out.returncode == 0, out
    top = out.stdout.splitlines()[1].removeprefix("logits: ").split()[0]
    assert top.split(":")[2] == str(y[0]), out.stdout
