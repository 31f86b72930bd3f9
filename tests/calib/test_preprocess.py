"""PreprocessSpec / preprocess against values computed directly with OpenCV and NumPy."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from calib.preprocess import PRESETS, PreprocessSpec, decode_image, load_image, preprocess


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_stretch_rgb_mean_std_nchw() -> None:
    img = _img(12, 20)
    spec = PreprocessSpec(size=(8, 10), resize="stretch", color="RGB", mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    x, t = preprocess(img, spec)
    ref = cv2.resize(img[:, :, ::-1].copy(), (10, 8), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    ref = ((ref - np.float32([1, 2, 3])) / np.float32([2, 4, 8])).transpose(2, 0, 1)
    assert x.shape == (3, 8, 10) == spec.input_shape
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, ref)
    assert (t.scale_x, t.scale_y, t.offset_x, t.offset_y) == (0.5, 8 / 12, 0.0, 0.0)


@pytest.mark.parametrize("interp,flag", [("nearest", cv2.INTER_NEAREST), ("cubic", cv2.INTER_CUBIC),
                                          ("area", cv2.INTER_AREA), ("linear", cv2.INTER_LINEAR)])
def test_interpolation_bgr_nhwc_scale_offset(interp: str, flag: int) -> None:
    img = _img(30, 17, seed=1)
    spec = PreprocessSpec(size=(9, 7), color="BGR", interpolation=interp, scale=(1 / 255,), offset=(-0.5,),
                          layout="NHWC")
    x, _ = preprocess(img, spec)
    ref = cv2.resize(img, (7, 9), interpolation=flag).astype(np.float32) * np.float32(1 / 255) + np.float32(-0.5)
    assert x.shape == (9, 7, 3)
    np.testing.assert_array_equal(x, ref)


def test_gray_float16() -> None:
    img = _img(10, 10, seed=2)
    spec = PreprocessSpec(size=(5, 5), color="GRAY", mean=(128.0,), std=(64.0,), dtype="float16")
    x, _ = preprocess(img, spec)
    g = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (5, 5), interpolation=cv2.INTER_LINEAR)
    ref = ((g.astype(np.float32) - 128) / 64)[None].astype(np.float16)
    assert x.shape == (1, 5, 5) and x.dtype == np.float16
    np.testing.assert_array_equal(x, ref)


def test_no_normalisation_keeps_pixel_values() -> None:
    img = _img(4, 4, seed=3)
    x, _ = preprocess(img, PreprocessSpec(size=(4, 4), color="BGR"))
    np.testing.assert_array_equal(x, img.transpose(2, 0, 1).astype(np.float32))


def test_letterbox_top_left_like_yolox() -> None:
    img = _img(10, 20, seed=4)
    spec = PreprocessSpec(size=(16, 16), resize="letterbox", anchor="top-left", pad_value=114, color="BGR")
    x, t = preprocess(img, spec)
    r = min(16 / 10, 16 / 20)
    resized = cv2.resize(img, (int(20 * r), int(10 * r)), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((16, 16, 3), 114, dtype=np.uint8)
    canvas[: resized.shape[0], : resized.shape[1]] = resized
    np.testing.assert_array_equal(x, canvas.transpose(2, 0, 1).astype(np.float32))
    assert (t.offset_x, t.offset_y) == (0.0, 0.0) and t.scale_x == pytest.approx(r)


def test_letterbox_center_and_box_round_trip() -> None:
    img = _img(30, 20, seed=5)
    spec = PreprocessSpec(size=(16, 16), resize="letterbox", anchor="center", pad_value=(0, 50, 100), color="RGB")
    x, t = preprocess(img, spec)
    # 30x20 -> scale 16/30 -> 16x10 (int truncation of 10.67), centred: 3 columns of padding left.
    new_w = int(20 * 16 / 30)
    left = (16 - new_w) // 2
    resized = cv2.resize(img[:, :, ::-1].copy(), (new_w, 16), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(x[:, :, left : left + new_w], resized.transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(x[:, 0, 0], [0, 50, 100])
    assert (t.offset_x, t.offset_y) == (float(left), 0.0)
    boxes = np.array([[0.0, 0.0, 20.0, 30.0], [2.5, 4.0, 11.0, 17.5]])
    model_boxes = t.to_model(boxes)
    np.testing.assert_allclose(model_boxes[0], [left, 0, left + new_w, 16])
    np.testing.assert_allclose(t.to_original(model_boxes), boxes, rtol=0, atol=1e-9)
    # Boxes reaching into the padding are clipped to the image.
    np.testing.assert_allclose(t.to_original(np.array([[0.0, 0.0, 16.0, 16.0]])), [[0, 0, 20, 30]])


def test_center_crop_resize_short() -> None:
    img = _img(30, 40, seed=6)
    spec = PreprocessSpec(size=(16, 16), resize="center-crop", resize_short=20, color="RGB", mean=127, std=128)
    x, t = preprocess(img, spec)
    resized = cv2.resize(img[:, :, ::-1].copy(), (40 * 20 // 30, 20), interpolation=cv2.INTER_LINEAR)
    top, left = round((20 - 16) / 2), round((26 - 16) / 2)
    crop = resized[top : top + 16, left : left + 16].astype(np.float32)
    np.testing.assert_array_equal(x, ((crop - 127) / 128).transpose(2, 0, 1))
    assert (t.offset_x, t.offset_y) == (-left, -top)
    boxes = np.array([[10.0, 9.0, 30.0, 21.0]])
    np.testing.assert_allclose(t.to_original(t.to_model(boxes)), boxes)


def test_center_crop_without_resize_short_covers_window() -> None:
    img = _img(20, 10, seed=7)
    x, t = preprocess(img, PreprocessSpec(size=(8, 8), resize="center-crop", color="BGR"))
    resized = cv2.resize(img, (8, 16), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(x, resized[4:12].transpose(2, 0, 1).astype(np.float32))


def test_efficientnet_preset_matches_reference_recipe() -> None:
    img = _img(256, 300, seed=8)
    x, _ = preprocess(img, PRESETS["efficientnet-lite0"])
    rgb = img[:, :, ::-1]
    top, left = round((256 - 224) / 2), round((300 - 224) / 2)
    ref = ((rgb[top : top + 224, left : left + 224].astype(np.float32) - 127) / 128).transpose(2, 0, 1)
    np.testing.assert_array_equal(x, ref)
    assert x.shape == (3, 224, 224)


def test_yolox_preset_shape_and_padding() -> None:
    img = _img(300, 500, seed=9)
    x, t = preprocess(img, PRESETS["yolox"])
    r = min(416 / 300, 416 / 500)
    assert x.shape == (3, 416, 416)
    assert int(300 * r) == 249
    assert (x[:, 249:, :] == 114).all()
    assert t.scale_y == pytest.approx(249 / 300)


def test_input_variants_gray_and_bgra() -> None:
    gray = _img(6, 6, seed=10)[:, :, 0]
    x, _ = preprocess(gray, PreprocessSpec(size=(6, 6), color="BGR"))
    np.testing.assert_array_equal(x[0], x[2])
    bgra = np.dstack([_img(6, 6, seed=11), np.full((6, 6), 7, np.uint8)])
    x2, _ = preprocess(bgra, PreprocessSpec(size=(6, 6), color="BGR"))
    np.testing.assert_array_equal(x2, bgra[:, :, :3].transpose(2, 0, 1).astype(np.float32))
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4, 3), np.float32), PreprocessSpec(size=(4, 4)))


def test_spec_dict_round_trip_and_errors() -> None:
    spec = PRESETS["yolox"]
    d = spec.to_dict()
    assert d["size"] == [416, 416] and d["pad_value"] == [114.0]
    assert PreprocessSpec.from_dict(d) == spec
    assert PreprocessSpec.from_dict({"size": 32}).size == (32, 32)
    with pytest.raises(ValueError, match="colour"):
        PreprocessSpec.from_dict({"size": [8, 8], "colour": "RGB"})
    with pytest.raises(ValueError, match=r"preprocess\.resize"):
        PreprocessSpec.from_dict({"size": [8, 8], "resize": "squash"})
    with pytest.raises(ValueError, match=r"preprocess\.size"):
        PreprocessSpec.from_dict({"resize": "stretch"})
    with pytest.raises(ValueError, match=r"preprocess\.(mean|std)"):
        PreprocessSpec(size=8, mean=(1.0,))
    with pytest.raises(ValueError, match=r"preprocess\.scale"):
        PreprocessSpec(size=8, mean=1, std=1, scale=2)
    with pytest.raises(ValueError, match=r"preprocess\.mean"):
        PreprocessSpec(size=8, mean=(1, 2), std=(1, 2))
    with pytest.raises(ValueError, match=r"preprocess\.resize_short"):
        PreprocessSpec(size=8, resize_short=10)
    with pytest.raises(ValueError, match=r"preprocess\.std"):
        PreprocessSpec(size=8, mean=0, std=0)


def test_decode_and_load(tmp_path) -> None:
    img = _img(5, 7, seed=12)
    ok, png = cv2.imencode(".png", img)
    assert ok
    np.testing.assert_array_equal(decode_image(png.tobytes()), img)
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
    with pytest.raises(ValueError, match="corrupt"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage" * 3)
    with pytest.raises(ValueError):
        decode_image(png.tobytes()[:30])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    good = tmp_path / "good.png"
    good.write_bytes(png.tobytes())
    np.testing.assert_array_equal(load_image(good), img)
