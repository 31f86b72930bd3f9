"""Client images to BGR uint8 arrays: encoded JPEG/PNG bytes or raw frames, checked per item.

Both the CPU and the GPU paths start here: decoding is OpenCV on the CPU either way (see
:func:`calib.preprocess.decode_image`). A bad item raises ``InvalidArgument`` naming its batch
index, before any work of the batch reaches a device, so one bad request never disturbs others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from calib.preprocess import decode_image
from daemon.errors import InvalidArgument
from daemon.processing.spec import PreprocessConfig

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
# Recognised only to say what was sent; serving accepts JPEG and PNG.
_OTHER = {
    b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD",
}


def _format_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete JPEG or PNG file, or None if it looks like one.

    libjpeg decodes a truncated file without error (the missing rows come back grey), so
    completeness is checked on the container: a JPEG must have its end-of-image marker after
    the last start-of-scan, a PNG its IEND chunk.
    """
    if data.startswith(_JPEG):
        sos = data.rfind(b"\xff\xda")
        if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
            return "truncated JPEG (no end-of-image marker after the image data)"
        return None
    if data.startswith(_PNG):
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            return "truncated PNG (no IEND chunk)"
        return None
    if data[8:12] == b"WEBP" and data.startswith(b"RIFF"):
        return "unsupported format WEBP (send JPEG or PNG)"
    for magic, name in _OTHER.items():
        if data.startswith(magic):
            return f"unsupported format {name} (send JPEG or PNG)"
    return "not a JPEG or PNG file"


def _item_bytes(item: object) -> bytes | None:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    return None


def decode_one(item: object, index: int, count: int, name: str, max_pixels: int) -> np.ndarray:
    where = f"input {name!r}, batch index {index} of {count}"
    data = _item_bytes(item)
    if data is None:
        raise InvalidArgument(f"{where}: expected encoded image bytes, got {type(item).__name__}")
    if not data:
        raise InvalidArgument(f"{where}: empty image (0 bytes)")
    problem = _format_problem(data)
    if problem is not None:
        raise InvalidArgument(f"{where}: cannot decode: {problem}")
    try:
        image = decode_image(data)
    except ValueError:
        raise InvalidArgument(f"{where}: cannot decode ({len(data)} bytes): corrupt or zero-sized image") from None
    pixels = image.shape[0] * image.shape[1]
    if pixels > max_pixels:
        raise InvalidArgument(
            f"{where}: image is {image.shape[1]}x{image.shape[0]} ({pixels} pixels), more than the model's "
            f"max_image_pixels {max_pixels}"
        )
    return image


def map_items(pool: Executor | None, fn: Callable, items: Sequence) -> list:
    if pool is None or len(items) < 2:
        return [fn(i, item) for i, item in enumerate(items)]
    # list() re-raises the first failure in batch order, so the message names the first bad index.
    return list(pool.map(fn, range(len(items)), items))


def decode_batch(batch: np.ndarray, config: PreprocessConfig, pool: Executor | None = None) -> list[np.ndarray]:
    """A BYTES tensor ``[N]`` or ``[N, 1]`` of JPEG/PNG files to ``N`` BGR uint8 images.

    With a ``pool``, images decode in parallel (OpenCV releases the GIL while it decodes).
    """
    arr = np.asarray(batch, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise InvalidArgument(
            f"input {config.input!r}: expected a BYTES tensor of shape [N] or [N, 1] with N >= 1 encoded images, "
            f"got shape {list(np.shape(batch))}"
        )
    count = arr.shape[0]

    def one(i: int, item: object) -> np.ndarray:
        return decode_one(item, i, count, config.input, config.max_image_pixels)

    return map_items(pool, one, list(arr))


def frames_batch(batch: np.ndarray, config: PreprocessConfig) -> list[np.ndarray]:
    """A UINT8 ``[N, H, W, 3]`` tensor of BGR frames to a list of ``N`` HxWx3 views."""
    arr = np.asarray(batch)
    where = f"input {config.input!r}"
    if arr.dtype != np.uint8:
        raise InvalidArgument(f"{where}: raw frames must be UINT8, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise InvalidArgument(f"{where}: raw frames must have shape [N, H, W, 3] (BGR), got {list(arr.shape)}")
    n, h, w = arr.shape[:3]
    if n == 0 or h == 0 or w == 0:
        raise InvalidArgument(f"{where}: raw frames must not be empty, got shape {list(arr.shape)}")
    if h * w > config.max_image_pixels:
        raise InvalidArgument(
            f"{where}: frames are {w}x{h} ({h * w} pixels), more than the model's max_image_pixels "
            f"{config.max_image_pixels}"
        )
    return [arr[i] for i in range(n)]


def load_batch(batch: np.ndarray, config: PreprocessConfig, pool: Executor | None = None) -> list[np.ndarray]:
    """The client tensor, whichever ``format`` the model takes, as BGR uint8 images."""
    if config.format == "encoded":
        return decode_batch(batch, config, pool)
    return frames_batch(batch, config)
