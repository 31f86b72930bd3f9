"""calib.image_header on real files written by OpenCV, in every format it writes, and on truncated,
corrupted and malicious headers: the right size, or ImageHeaderError (a ValueError), nothing else."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from calib.image_header import ImageHeader, ImageHeaderError, read_header, sniff
from calib.preprocess import decode, decode_image
from tests.processing.helpers import smooth_image
from tests.processing.hostile import bomb_jpeg, bomb_png

H, W = 37, 53  # odd sizes: nothing lines up with 8x8 blocks or bytes of a 1-bit row
BGR = smooth_image(H, W, seed=3)
BGRA = np.dstack([BGR, np.full((H, W), 100, np.uint8)])  # translucent: encoders drop an opaque alpha


def _encode(ext: str, image: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return buf.tobytes()


OPENCV_FILES = {
    "PNG BGR": (".png", BGR, (), ("PNG", 3, 8)),
    "PNG grey": (".png", BGR[:, :, 0], (), ("PNG", 1, 8)),
    "PNG BGRA": (".png", BGRA, (), ("PNG", 4, 8)),
    "PNG 16-bit": (".png", BGR.astype(np.uint16) * 257, (), ("PNG", 3, 16)),
    "JPEG baseline": (".jpg", BGR, (), ("JPEG", 3, 8)),
    "JPEG grey": (".jpg", BGR[:, :, 0], (), ("JPEG", 1, 8)),
    "JPEG progressive": (".jpg", BGR, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1), ("JPEG", 3, 8)),
    "JPEG optimized 4:4:4": (".jpg", BGR, (cv2.IMWRITE_JPEG_OPTIMIZE, 1, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), ("JPEG", 3, 8)),
    "BMP": (".bmp", BGR, (), ("BMP", 3, 24)),
    "BMP grey": (".bmp", BGR[:, :, 0], (), ("BMP", 3, 8)),
    "TIFF": (".tiff", BGR, (), ("TIFF", 3, 8)),
    "TIFF grey": (".tiff", BGR[:, :, 0], (), ("TIFF", 1, 8)),
    "TIFF 16-bit": (".tiff", BGR.astype(np.uint16), (), ("TIFF", 3, 16)),
    "WEBP lossy": (".webp", BGR, (cv2.IMWRITE_WEBP_QUALITY, 80), ("WEBP", 3, 8)),
    "WEBP lossless": (".webp", BGR, (cv2.IMWRITE_WEBP_QUALITY, 101), ("WEBP", 3, 8)),
    "WEBP lossless alpha": (".webp", BGRA, (cv2.IMWRITE_WEBP_QUALITY, 101), ("WEBP", 4, 8)),
    "WEBP lossy alpha (VP8X)": (".webp", BGRA, (cv2.IMWRITE_WEBP_QUALITY, 80), ("WEBP", 4, 8)),
    "GIF": (".gif", BGR, (), ("GIF", 3, 8)),
}


@pytest.mark.parametrize("name", sorted(OPENCV_FILES))
def test_opencv_files_give_their_size_channels_and_depth(name):
    ext, image, params, (fmt, channels, depth) = OPENCV_FILES[name]
    try:
        data = _encode(ext, image, params)
    except (AssertionError, cv2.error):
        pytest.skip(f"this OpenCV build cannot write {name}")
    header = read_header(data)
    assert (header.format, header.width, header.height) == (fmt, W, H)
    assert (header.channels, header.bit_depth) == (channels, depth)
    assert header.progressive == (name == "JPEG progressive")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[:2] == header.oriented_size


def test_formats_it_cannot_size_are_named_or_refused():
    for ext in (".ppm", ".pgm", ".jp2", ".hdr"):
        try:
            data = _encode(ext, BGR if ext != ".hdr" else BGR.astype(np.float32))
        except (AssertionError, cv2.error):
            continue
        with pytest.raises(ImageHeaderError):
            read_header(data)
    assert sniff(_encode(".png", BGR)) == "PNG" and sniff(b"\x00\x00\x01\x00rest") == "ICO"
    with pytest.raises(ImageHeaderError, match="ICO file"):
        read_header(b"\x00\x00\x01\x00" + bytes(40))


def _exif_jpeg(orientation: int) -> bytes:
    tiff = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    app1 = b"Exif\x00\x00" + tiff
    jpeg = _encode(".jpg", BGR)
    return jpeg[:2] + struct.pack(">BBH", 0xFF, 0xE1, len(app1) + 2) + app1 + jpeg[2:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_and_applied_as_opencv_does(orientation):
    data = _exif_jpeg(orientation)
    header = read_header(data)
    assert header.orientation == orientation
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert header.oriented_size == reference.shape[:2]
    np.testing.assert_array_equal(decode(data, header).image, reference)


def test_jpeg_decoding_matches_opencv_bit_for_bit():
    for params in ((), (cv2.IMWRITE_JPEG_PROGRESSIVE, 1), (cv2.IMWRITE_JPEG_QUALITY, 40)):
        for image in (smooth_image(120, 161, seed=5), smooth_image(64, 64, seed=6)[:, :, 0]):
            data = _encode(".jpg", image, params)
            decoded = decode(data, read_header(data))
            assert decoded.warning is None
            np.testing.assert_array_equal(decoded.image, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


def test_hand_made_bombs_are_read_without_decoding():
    assert read_header(bomb_png(20000, 20000)) == ImageHeader("PNG", 20000, 20000, 1, 1)
    jpeg = read_header(bomb_jpeg(20000, 20000))
    assert (jpeg.format, jpeg.width, jpeg.height, jpeg.channels) == ("JPEG", 20000, 20000, 1)
    # a progressive JPEG keeps its coefficients: more memory than the pixels
    assert read_header(bomb_jpeg(1000, 1000, progressive=True)).decode_bytes() > jpeg.decode_bytes() / 400
    with pytest.raises(ValueError, match="more than the limit of 40000000 pixels"):
        decode_image(bomb_png(20000, 20000))


def _all_files() -> list[bytes]:
    files = [_encode(".png", BGR), _encode(".jpg", BGR), _encode(".jpg", BGR, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
             _encode(".bmp", BGR), _encode(".tiff", BGR), _encode(".webp", BGR), _exif_jpeg(6),
             bomb_jpeg(64, 48), bomb_png(64, 48)]
    try:
        files.append(_encode(".gif", BGR))
    except (AssertionError, cv2.error):
        pass
    return files


def _only_header_errors(data: bytes) -> None:
    try:
        read_header(data)
    except ImageHeaderError:
        pass


def test_every_truncation_of_every_header_gives_a_header_error_or_a_size():
    for data in _all_files():
        for end in range(0, min(len(data), 400)):
            _only_header_errors(data[:end])


def test_random_corruption_of_headers_gives_a_header_error_or_a_size():
    rng = np.random.default_rng(11)
    for data in _all_files():
        for _ in range(300):
            b = bytearray(data[:600])
            for at in rng.integers(0, min(len(b), 64), size=rng.integers(1, 4)):
                b[at] = int(rng.integers(0, 256))
            _only_header_errors(bytes(b))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sIIBBBBB", 13, b"IHDR", 0, 10, 8, 2, 0, 0, 0) + bytes(4), "zero-sized image"),
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sIIBBBBB", 13, b"IHDR", 0xFFFFFFFF, 1, 8, 2, 0, 0, 0) + bytes(4), r"2\^31-1"),
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sIIBBBBB", 13, b"IHDR", 5, 5, 3, 2, 0, 0, 0) + bytes(4), "bit depth 3"),
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 13, b"IDAT") + bytes(17), "not a 13-byte IHDR"),
        (b"\xff\xd8\xff\xe0\x00\x00", "segment length 0"),
        (b"\xff\xd8" + b"\xff" * 3000, "truncated JPEG"),
        (b"\xff\xd8\xff\xda\x00\x08" + bytes(10), "no frame header"),
        (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x00\x10\x01\x01\x11\x00", "DNL"),
        (b"\xff\xd8\xff\xc0\x00\x08\x08\x00\x10\x00\x10\x00", "0 components"),
        (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x00\x00", "sampling factor 0"),
        (b"\xff\xd8\xff\xe0\xff\xff" + bytes(100), "truncated JPEG"),
        (b"\xff\xd8\xff\xe0\x00\x04\x00\x00\x12\x34", "expected a marker"),
        (b"II*\x00" + struct.pack("<I", 1 << 30), "truncated TIFF"),
        (b"II*\x00" + struct.pack("<IH", 8, 0xFFFF) + bytes(20), "truncated TIFF"),
        (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 256, 4, 1, 7) + bytes(4), "no width or height"),
        (b"II+\x00" + bytes(12), "BigTIFF"),
        (b"BM" + bytes(12) + struct.pack("<I", 20) + bytes(20), "DIB header of 20 bytes"),
        (b"BM" + bytes(12) + struct.pack("<Iii", 40, 0, -5) + bytes(20), "zero-sized image"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(20), "no start code"),
        (b"RIFF\x00\x00\x00\x00WEBPABCD" + bytes(20), "none of VP8"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8L", "truncated WEBP"),
        (b"GIF89a\x00\x00\x05\x00", "zero-sized image"),
        (b"not an image at all", "not an image file of a known format"),
    ],
)
def test_malicious_headers_are_refused_with_a_reason(data, words):
    with pytest.raises(ImageHeaderError, match=words):
        read_header(data)


def test_a_header_walk_is_bounded_whatever_the_file_holds():
    # 64 MB of fill bytes or of empty comment segments: the walk gives up after 4096 markers.
    for filler in (b"\xff" * 64_000_000, b"\xff\xfe\x00\x02" * 16_000_000):
        with pytest.raises(ImageHeaderError, match="no frame header .* in the first 4096 markers"):
            read_header(b"\xff\xd8" + filler)


def test_negative_bmp_height_means_top_down():
    data = b"BM" + bytes(12) + struct.pack("<IiiHH", 40, 7, -9, 1, 24) + bytes(20)
    assert read_header(data) == ImageHeader("BMP", 7, 9, 3, 24)
