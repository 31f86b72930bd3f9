"""YOLO post-processing with class labels: a BYTES `labels` output of each detection's class name,
and `tegrad infer` printing detections as a table (label, score, box in original-image pixels)."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import tritonclient.grpc as grpcclient

from tests.onnx_models import DETECTOR_CONFIG, fixed_detector


def test_detections_carry_labels_and_the_cli_prints_a_table(server_factory, tmp_path):
    root = tmp_path / "repo"
    fixed_detector(root / "detector" / "1" / "model.onnx")
    (root / "detector" / "labels.txt").write_text("cat\ndog\n")
    (root / "detector" / "config.toml").write_text(DETECTOR_CONFIG + 'labels = "labels.txt"\n')
    server = server_factory(repository=root)
    image = np.full((64, 128, 3), 40, np.uint8)  # letterboxed at scale 0.5, 16 rows of padding above
    path = tmp_path / "frame.png"
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())

    with grpcclient.InferenceServerClient(server.url) as c:
        meta = c.get_model_metadata("detector")
        assert ("labels", "BYTES", [-1, 5]) in [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
        inp = grpcclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([path.read_bytes()], dtype=object))
        result = c.infer("detector", [inp])
        assert list(result.as_numpy("count")) == [2]
        assert [v.decode() for v in result.as_numpy("labels")[0]] == ["cat", "dog", "", "", ""]
        assert list(result.as_numpy("classes")[0]) == [0, 1, -1, -1, -1]

    done = subprocess.run([sys.executable, "-m", "daemon", "infer", "-m", "detector", "--image", str(path),
                           "--url", server.url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[1] == "image 0: 2 detections (boxes x1 y1 x2 y2 in pixels of the original image)", lines
    assert lines[2].split() == ["LABEL", "SCORE", "X1", "Y1", "X2", "Y2"]
    assert lines[3].split() == ["cat", "0.900", "44.0", "22.0", "84.0", "42.0"], lines
    assert lines[4].split() == ["dog", "0.700", "12.0", "0.0", "28.0", "16.0"], lines
    assert len(lines) == 5


def test_labels_on_a_raw_postprocess_are_refused(server_factory, tmp_path):
    root = tmp_path / "repo"
    fixed_detector(root / "detector" / "1" / "model.onnx")
    (root / "detector" / "labels.txt").write_text("cat\ndog\n")
    (root / "detector" / "config.toml").write_text('[postprocess]\nkind = "raw"\nlabels = "labels.txt"\n')
    server = server_factory(repository=root, args=("--exit-on-error=false",))
    with grpcclient.InferenceServerClient(server.url) as c:
        [model] = c.get_model_repository_index().models
        assert model.state == "UNAVAILABLE" and "labels: applies to kind = 'classification' or 'yolo'" in model.reason
