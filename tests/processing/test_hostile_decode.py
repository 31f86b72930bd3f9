"""Hostile images against the daemon's decode path (daemon.processing.images): refused from the
header in microseconds, every intermediate image bounded, extreme strips refused with their
numbers, the rest of a failing request skipped, and truncated-but-terminated JPEGs accepted with
their corruption reported."""

from __future__ import annotations

import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from daemon.errors import InvalidArgument
from daemon.processing.cpu import CpuPreprocessor
from daemon.processing.images import BatchDecoder, check_batch, decode_checked
from daemon.processing.spec import PreprocessConfig
from tests.processing.helpers import encode, smooth_image
from tests.processing.hostile import bomb_jpeg, bomb_png, strip_png, truncated_jpeg_with_eoi

DIGITS = PreprocessConfig(size=8, resize="stretch", interpolation="area", color="GRAY", scale=1 / 255)
EFFNET = PreprocessConfig(size=224, resize="center-crop", resize_short=256, mean=127.0, std=128.0)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"PNG 20000x20000": bomb_png(20000, 20000), "JPEG 20000x20000": bomb_jpeg(20000, 20000),
            "PNG 30000x30000": bomb_png(30000, 30000)}


@pytest.mark.parametrize("config", [DIGITS, EFFNET], ids=["stretch", "center-crop"])
@pytest.mark.parametrize("name", ["PNG 20000x20000", "JPEG 20000x20000", "PNG 30000x30000"])
def test_bombs_are_refused_from_the_header_in_well_under_50_ms(bombs, config, name):
    good = encode(smooth_image(32, 32), ".png")
    batch = np.array([good, bombs[name], good], dtype=object)
    start = time.perf_counter()
    with pytest.raises(InvalidArgument) as err:
        CpuPreprocessor(config)(batch)
    elapsed = time.perf_counter() - start
    side = name.split()[1].split("x")[0]
    assert f"batch index 1 of 3: image is {name.split()[0]} {side}x{side} ({int(side) ** 2} pixels" in str(err.value)
    assert "max_image_pixels 40000000" in str(err.value)
    assert elapsed < 0.05, f"{elapsed * 1000:.1f} ms"


def test_a_batch_of_eight_bombs_is_refused_at_the_first_before_any_decoding(bombs):
    batch = np.array([bombs["PNG 20000x20000"]] * 8, dtype=object)
    start = time.perf_counter()
    with pytest.raises(InvalidArgument, match="batch index 0 of 8"):
        check_batch(list(batch), DIGITS)
    assert time.perf_counter() - start < 0.05


def test_every_intermediate_image_is_bounded_not_only_the_input():
    strip = strip_png(20000, 1)
    assert len(strip) < 200
    with pytest.raises(InvalidArgument) as err:
        check_batch([strip], EFFNET)
    message = str(err.value)
    assert "image is 20000x1 (aspect ratio 20000:1)" in message
    assert "center-crop to 224x224 would make a 5120000x256 resized image (1310720000 pixels)" in message
    assert "max_image_pixels 40000000" in message
    # Letterbox and stretch shrink it: there the aspect ratio is what refuses it.
    with pytest.raises(InvalidArgument, match=r"image is 20000x1, aspect ratio 20000\.0:1, more extreme than the "
                                              r"model's max_aspect_ratio 100"):
        check_batch([strip], DIGITS)


def test_aspect_ratio_and_pixel_limits_are_configurable():
    wide = encode(smooth_image(4, 300), ".png")  # 75:1
    assert check_batch([wide], DIGITS)[0].header.width == 300
    with pytest.raises(InvalidArgument, match="max_aspect_ratio 50"):
        check_batch([wide], DIGITS.model_copy(update={"max_aspect_ratio": 50.0}))
    # center-crop: the 4-pixel short side resized to 256 makes it 19200x256, over a small pixel limit
    with pytest.raises(InvalidArgument, match="would make a 19200x256 resized image"):
        check_batch([wide], EFFNET.model_copy(update={"max_image_pixels": 1_000_000}))


def test_the_memory_estimate_covers_the_decoded_image_and_its_row_of_the_batch():
    image = smooth_image(480, 640)
    (item,) = check_batch([encode(image, ".jpg")], EFFNET)
    assert item.nbytes == 480 * 640 * 3 + 224 * 224 * 3 * 4
    # a progressive JPEG's decoder holds every coefficient (4:2:0: 1.5 samples a pixel, 2 bytes each)
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    (item,) = check_batch([progressive], EFFNET)
    assert item.nbytes == 480 * 640 * 3 + 480 * 640 * 3 + 224 * 224 * 3 * 4


def _corrupt_body_png() -> bytes:
    """A PNG whose header and IEND are fine but whose pixel data is not a zlib stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00garbage" * 50) + chunk(b"IEND", b"")


def test_after_one_item_fails_to_decode_the_rest_of_its_request_is_skipped():
    good = encode(smooth_image(64, 64), ".png")
    items = check_batch([good, _corrupt_body_png()] + [good] * 6, DIGITS)
    decoded, skipped = [], []
    decoder = BatchDecoder(lambda item, d: decoded.append(item.index), lambda item: skipped.append(item.index))
    with ThreadPoolExecutor(1) as pool:  # one thread: items run in order
        futures = [pool.submit(decoder, item) for item in items]
        with pytest.raises(InvalidArgument, match="batch index 1 of 8: cannot decode"):
            for f in futures:
                f.result()
        for f in futures[2:]:
            assert f.result() is None
    assert decoded == [0] and skipped == [1, 2, 3, 4, 5, 6, 7]


def test_a_truncated_jpeg_with_an_end_marker_is_accepted_and_reported_corrupt():
    image = smooth_image(96, 128, seed=4)
    data = truncated_jpeg_with_eoi(image)
    (item,) = check_batch([data], DIGITS)
    decoded = decode_checked(item)
    assert decoded.image.shape == (96, 128, 3)
    assert decoded.warning and "premature end of data segment" in decoded.warning
    assert decode_checked(check_batch([encode(image, ".jpg")], DIGITS)[0]).warning is None
    # without the end marker it is refused, as before
    with pytest.raises(InvalidArgument, match="truncated JPEG"):
        check_batch([data[:-2]], DIGITS)


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    data = cv2.imencode(".jpg", smooth_image(64, 64), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert check_batch([data], DIGITS)  # a real one has about ten scans
    sos = data.index(b"\xff\xda")
    # the same first scan repeated: every repeat is one more pass over every block
    end = data.index(b"\xff", data.index(b"\xff\xda") + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"))
    bomb = data[:end] + data[sos:end] * 2000 + b"\xff\xd9"
    with pytest.raises(InvalidArgument, match="progressive JPEG 64x64 with 2001 scans, more than the 500"):
        check_batch([bomb], DIGITS)


def test_unserved_formats_say_what_was_sent_and_its_size():
    with pytest.raises(InvalidArgument, match=r"unsupported format BMP \(40x30, \d+ bytes; send JPEG or PNG\)"):
        check_batch([encode(smooth_image(30, 40), ".bmp")], DIGITS)
    with pytest.raises(InvalidArgument, match=r"unsupported format TIFF \(40x30"):
        check_batch([encode(smooth_image(30, 40), ".tiff")], DIGITS)
