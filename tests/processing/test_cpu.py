from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from calib.detection import postprocess as calib_postprocess
from calib.preprocess import Transform, preprocess
from daemon.errors import InvalidArgument
from daemon.processing.cpu import CpuPostprocessor, CpuPreprocessor
from daemon.processing.geometry import plan
from daemon.processing.spec import PostprocessConfig, PreprocessConfig

from .helpers import craft_yolo, encode, random_image, tiny_gif, zero_sized_png


def run_cpu(image: np.ndarray, **keys) -> tuple[np.ndarray, Transform]:
    pre = CpuPreprocessor(PreprocessConfig(**keys))
    out, transforms = pre.run([image])
    return out[0], transforms[0]


# ---------------------------------------------------------------------------- geometry and colour


def test_stretch_matches_opencv_and_swaps_to_rgb():
    img = random_image(7, 5, seed=1)
    out, t = run_cpu(img, size=(4, 6), color="RGB", layout="NHWC")
    want = cv2.resize(img, (6, 4), interpolation=cv2.INTER_LINEAR)[:, :, ::-1].astype(np.float32)
    np.testing.assert_array_equal(out, want)
    assert (t.scale_x, t.scale_y, t.offset_x, t.offset_y) == (6 / 5, 4 / 7, 0.0, 0.0)


def test_nearest_and_gray_match_opencv():
    img = random_image(9, 11, seed=2)
    out, _ = run_cpu(img, size=(5, 4), color="GRAY", interpolation="nearest")
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(out[0], cv2.resize(gray, (4, 5), interpolation=cv2.INTER_NEAREST).astype(np.float32))


@pytest.mark.parametrize(("anchor", "top"), [("top-left", 0), ("center", 2)])
def test_letterbox_pads_with_value_at_anchor(anchor, top):
    img = random_image(10, 20, seed=3)
    out, t = run_cpu(img, size=(8, 8), resize="letterbox", anchor=anchor, pad_value=114, color="BGR", layout="NHWC")
    resized = cv2.resize(img, (8, 4), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    np.testing.assert_array_equal(out[top : top + 4], resized)
    pad = np.delete(out, np.s_[top : top + 4], axis=0)
    assert pad.shape == (4, 8, 3) and np.all(pad == 114.0)
    assert (t.scale_x, t.scale_y, t.offset_x, t.offset_y) == (0.4, 0.4, 0.0, float(top))


def test_center_crop_resizes_short_side_then_crops():
    img = random_image(12, 16, seed=4)
    out, t = run_cpu(img, size=(6, 6), resize="center-crop", resize_short=8, color="BGR", layout="NHWC")
    want = cv2.resize(img, (10, 8), interpolation=cv2.INTER_LINEAR)[1:7, 2:8].astype(np.float32)
    np.testing.assert_array_equal(out, want)
    assert (t.offset_x, t.offset_y) == (-2.0, -1.0)


def test_normalisation_by_hand():
    img = np.array([[[10, 20, 30], [200, 100, 0]]], dtype=np.uint8)  # one row, two BGR pixels
    out, _ = run_cpu(img, size=(1, 2), color="RGB", mean=[30, 20, 10], std=[2, 4, 5])
    # RGB planes: R = (30, 0), G = (20, 100), B = (10, 200)
    np.testing.assert_array_equal(out, np.array([[[0.0, -15.0]], [[0.0, 20.0]], [[0.0, 38.0]]], np.float32))
    out, _ = run_cpu(img, size=(1, 2), color="BGR", scale=0.5, offset=[1, 2, 3], layout="NHWC")
    np.testing.assert_array_equal(out, np.array([[[6, 12, 18], [101, 52, 3]]], np.float32))
    out, _ = run_cpu(img, size=(1, 2), color="BGR", scale=1 / 255, dtype="float16")
    assert out.dtype == np.float16 and out.shape == (3, 1, 2)
    np.testing.assert_array_equal(out, (img.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)).astype(np.float16))


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "center-crop"])
@pytest.mark.parametrize("anchor", ["top-left", "center"])
def test_geometry_plan_agrees_with_calib(resize, anchor):
    rng = np.random.default_rng(5)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        keys = {"size": (int(rng.integers(8, 64)), int(rng.integers(8, 64))), "resize": resize}
        if resize == "letterbox":
            keys["anchor"] = anchor
        if resize == "center-crop" and anchor == "center":
            keys["resize_short"] = int(rng.integers(4, 80))
        spec = PreprocessConfig(**keys).to_spec()
        out, t = preprocess(np.zeros((h, w, 3), np.uint8), spec)
        p = plan((h, w), spec)
        assert p.transform == t, (h, w, keys)
        rh, rw = p.resized_hw
        assert (rw / w, rh / h) == (t.scale_x, t.scale_y)


def test_letterbox_box_mapping_round_trips():
    spec = PreprocessConfig(size=(64, 64), resize="letterbox", anchor="center").to_spec()
    _, t = preprocess(np.zeros((480, 640, 3), np.uint8), spec)
    boxes = np.array([[0, 0, 640, 480], [100.5, 20.25, 300, 470], [639, 479, 640, 480]], np.float64)
    np.testing.assert_allclose(t.to_original(t.to_model(boxes)), boxes, atol=1e-9)
    # the whole image lands inside the canvas, centred vertically
    model = t.to_model(boxes[:1])[0]
    assert model[0] == 0 and model[2] == 64 and model[1] == pytest.approx(8) and model[3] == pytest.approx(56)


def test_thread_pool_gives_the_same_batch():
    images = [random_image(30 + i, 40 - i, seed=i) for i in range(5)]
    cfg = PreprocessConfig(size=(16, 16), resize="letterbox", scale=1 / 255)
    plain, t1 = CpuPreprocessor(cfg).run(images)
    with ThreadPoolExecutor(2) as pool:
        pooled, t2 = CpuPreprocessor(cfg, pool).run(images)
    np.testing.assert_array_equal(plain, pooled)
    assert t1 == t2


# ---------------------------------------------------------------------------- decoding and bad images


def test_decodes_jpeg_and_png_in_n_and_n1_shapes():
    img = random_image(20, 30, seed=6)
    batch = np.array([encode(img, ".png"), encode(img, ".jpg")], dtype=object)
    pre = CpuPreprocessor(PreprocessConfig(size=8))
    decoded = pre.decode(batch)
    np.testing.assert_array_equal(decoded[0], img)
    assert decoded[1].shape == (20, 30, 3)
    assert len(pre.decode(batch.reshape(2, 1))) == 2
    tensor, transforms = pre(batch)
    assert tensor.shape == (2, 3, 8, 8) and len(transforms) == 2


def _bad_items() -> dict[str, object]:
    jpeg = encode(random_image(64, 64, seed=7), ".jpg")
    png = encode(random_image(64, 64, seed=7), ".png")
    return {
        "random bytes": np.random.default_rng(8).bytes(500),
        "truncated JPEG": jpeg[: len(jpeg) // 2],
        "truncated PNG": png[: len(png) // 2],
        "empty": b"",
        "zero-sized PNG": zero_sized_png(),
        "GIF": tiny_gif(),
        "BMP": encode(random_image(4, 4), ".bmp"),
        "not bytes": 12345,
    }


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("random bytes", "not a JPEG or PNG file"),
        ("truncated JPEG", "truncated JPEG"),
        ("truncated PNG", "truncated PNG"),
        ("empty", "empty image"),
        ("zero-sized PNG", "zero-sized image: the PNG header says 0x0"),
        ("GIF", "unsupported format GIF"),
        ("BMP", "unsupported format BMP"),
        ("not bytes", "expected encoded image bytes, got int"),
    ],
)
def test_bad_image_is_rejected_naming_its_batch_index(name, words):
    good = encode(random_image(16, 16), ".jpg")
    batch = np.array([good, good, _bad_items()[name], good], dtype=object)
    pre = CpuPreprocessor(PreprocessConfig(size=8))
    with pytest.raises(InvalidArgument) as err:
        pre(batch)
    assert "input 'image', batch index 2 of 4" in str(err.value)
    assert words in str(err.value)
    # the preprocessor is unharmed: the next (good) batch works
    assert pre(batch[[0, 1]])[0].shape == (2, 3, 8, 8)


def test_first_bad_index_is_reported_with_a_pool():
    good = encode(random_image(16, 16), ".png")
    batch = np.array([good, b"", good, b"junk"], dtype=object)
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(InvalidArgument, match="batch index 1 of 4"):
            CpuPreprocessor(PreprocessConfig(size=8), pool).decode(batch)


def test_oversized_and_malformed_batches_are_rejected():
    png = encode(random_image(100, 100), ".png")
    with pytest.raises(InvalidArgument, match="max_image_pixels 5000"):
        CpuPreprocessor(PreprocessConfig(size=8, max_image_pixels=5000)).decode(np.array([png], dtype=object))
    with pytest.raises(InvalidArgument, match=r"shape \[N\] or \[N, 1\]"):
        CpuPreprocessor(PreprocessConfig(size=8)).decode(np.empty((0,), dtype=object))


def test_raw_frames_are_validated():
    pre = CpuPreprocessor(PreprocessConfig(size=8, format="raw"))
    frames = np.stack([random_image(10, 12, seed=s) for s in range(3)])
    tensor, transforms = pre(frames)
    assert tensor.shape == (3, 3, 8, 8) and transforms[2].src_size == (10, 12)
    with pytest.raises(InvalidArgument, match="must be UINT8"):
        pre(frames.astype(np.float32))
    with pytest.raises(InvalidArgument, match=r"\[N, H, W, 3\]"):
        pre(frames[..., :2])
    with pytest.raises(InvalidArgument, match="must not be empty"):
        pre(np.zeros((1, 0, 12, 3), np.uint8))


# ---------------------------------------------------------------------------- classification


def test_classification_top_k_softmax_and_labels():
    logits = np.array([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 5.0, -1.0]], np.float32)
    post = CpuPostprocessor(PostprocessConfig(kind="classification", top_k=2, softmax=True, labels="l.txt"),
                            labels=["cat", "dog", "fox"])
    out = post.run({"logits": logits})
    np.testing.assert_array_equal(out["classes"], [[1, 3], [2, 0]])  # tie: lower index first
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["scores"], [[p[0, 1], p[0, 3]], [p[1, 2], p[1, 0]]], rtol=1e-6)
    assert out["labels"].tolist() == [[b"dog", b"3"], [b"fox", b"cat"]]  # id 3 has no label
    assert out["scores"].dtype == np.float32 and out["classes"].dtype == np.int32


def test_classification_raw_scores_and_padding_past_class_count():
    post = CpuPostprocessor(PostprocessConfig(kind="classification", top_k=4))
    out = post.run({"logits": np.array([[0.5, -2.0, 7.0]], np.float32)})
    np.testing.assert_array_equal(out["classes"], [[2, 0, 1, -1]])
    np.testing.assert_array_equal(out["scores"], [[7.0, 0.5, -2.0, 0.0]])
    assert "labels" not in out


# ---------------------------------------------------------------------------- detection

# Four boxes in model pixels of a 64x64 input: a duplicate of the first (same class,
# IoU 0.68), the same duplicate box with another class, a separate box, one under threshold.
DETS = [
    (3, (10, 18, 30, 38), 0, 0.9),
    (5, (12, 20, 32, 40), 0, 0.8),
    (9, (12, 20, 32, 40), 1, 0.7),
    (20, (40, 20, 60, 40), 2, 0.6),
    (30, (40, 20, 60, 40), 2, 0.1),
]


@pytest.mark.parametrize("variant", ["yolox", "yolov5", "yolov8"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_yolo_decode_nms_and_letterbox_mapping(variant, agnostic):
    pred = craft_yolo(variant, DETS)[None]
    pre = PreprocessConfig(size=64, resize="letterbox", anchor="center")
    _, t = preprocess(np.zeros((128, 256, 3), np.uint8), pre.to_spec())  # r = 0.25, content rows 16..48
    cfg = PostprocessConfig(kind="yolo", variant=variant, score_threshold=0.25, iou_threshold=0.45,
                            max_detections=5, class_agnostic=agnostic)
    out = CpuPostprocessor(cfg, input_hw=(64, 64)).run({"output": pred}, [t])
    want = [(0, 0.9, (40, 8, 120, 88)), (1, 0.7, (48, 16, 128, 96)), (2, 0.6, (160, 16, 240, 96))]
    if agnostic:
        want.pop(1)
    n = len(want)
    assert out["count"].tolist() == [n]
    np.testing.assert_array_equal(out["classes"][0], [c for c, _, _ in want] + [-1] * (5 - n))
    np.testing.assert_allclose(out["scores"][0, :n], [s for _, s, _ in want], rtol=1e-6)
    np.testing.assert_allclose(out["boxes"][0, :n], [b for _, _, b in want], atol=1e-3)
    assert not out["boxes"][0, n:].any() and not out["scores"][0, n:].any()
    assert out["boxes"].shape == (1, 5, 4) and out["boxes"].dtype == np.float32


@pytest.mark.parametrize("variant", ["yolox", "yolov5", "yolov8"])
def test_yolo_agrees_with_calib_reference(variant):
    from .helpers import random_yolo

    rng = np.random.default_rng(11)
    pred = np.stack([random_yolo(variant, rng) for _ in range(2)])
    cfg = PostprocessConfig(kind="yolo", variant=variant, score_threshold=0.5, iou_threshold=0.5, max_detections=30)
    out = CpuPostprocessor(cfg, input_hw=(128, 128)).run({"o": pred})
    ref = calib_postprocess(pred, variant, (128, 128), 0.5, 0.5, 30)
    for i, det in enumerate(ref):
        n = int(out["count"][i])
        assert n == len(det) > 0
        np.testing.assert_array_equal(out["classes"][i, :n], det.classes)
        np.testing.assert_array_equal(out["scores"][i, :n], det.scores)
        np.testing.assert_allclose(out["boxes"][i, :n], det.boxes, atol=1e-4)


def test_max_detections_caps_and_raw_passes_through():
    dets = [(i, (i * 6.0, 0, i * 6.0 + 5, 5), 0, 0.9 - i * 0.01) for i in range(10)]
    cfg = PostprocessConfig(kind="yolo", variant="yolov5", max_detections=3)
    out = CpuPostprocessor(cfg).run({"o": craft_yolo("yolov5", dets)[None]})
    assert out["count"].tolist() == [3]
    np.testing.assert_allclose(out["scores"][0], [0.9, 0.89, 0.88], rtol=1e-6)
    outputs = {"a": np.ones(3), "b": np.zeros(2)}
    assert CpuPostprocessor(PostprocessConfig(kind="raw")).run(outputs) == outputs


def test_gpu_modules_import_without_cuda():
    for name in ("daemon.processing.gpu", "daemon.processing.gpu_post", "daemon.processing.device"):
        importlib.import_module(name)
