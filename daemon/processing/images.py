"""Client images to BGR uint8 arrays: encoded JPEG/PNG bytes or raw frames, checked per item.

Both the CPU and the GPU paths start here: decoding is on the CPU either way (see
:func:`calib.preprocess.decode`). Every item of a request is checked from its header first
(:func:`check_item`: format, pixels, every intermediate image preprocessing will make, aspect
ratio), before any pixel of any item is decoded, so a decompression bomb costs microseconds.
A bad item raises ``InvalidArgument`` naming its batch index; once one item of a request
fails, the items not yet started are skipped (:class:`BatchDecoder`), so one bad request
never keeps the decode threads from others.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from calib.image_header import ImageHeader, ImageHeaderError, read_header, sniff
from calib.preprocess import DecodedImage, PreprocessSpec, decode, intermediate_sizes
from daemon.errors import InvalidArgument
from daemon.processing.budget import mib
from daemon.processing.spec import PreprocessConfig

SERVED = ("JPEG", "PNG")
# A progressive JPEG's decoder walks every block of the image once per scan: a small file of
# thousands of scans costs minutes of CPU. Encoders write about ten; libjpeg-turbo's TurboJPEG
# API stops at 500 when asked to limit them (OpenCV never asks).
MAX_PROGRESSIVE_SCANS = 500


@dataclass(frozen=True)
class CheckedImage:
    """An encoded item whose header passed every limit; ``nbytes`` is its memory estimate."""

    where: str
    index: int
    data: bytes
    header: ImageHeader
    nbytes: int


def _truncation(data: bytes, fmt: str) -> str | None:
    """Why ``data`` is not a complete JPEG or PNG file, or None if it looks like one.

    libjpeg decodes a truncated file without error (the missing rows come back grey), so
    completeness is checked on the container: a JPEG must have an end-of-image marker after its
    image data, a PNG its IEND chunk.
    """
    if fmt == "JPEG":
        # Encoders end the file with the marker (a few trailer bytes at most): look there first, as
        # a scan of the whole file costs milliseconds per megabyte. Entropy-coded data never holds
        # 0xFFD9 (0xFF is stuffed), so the first one after the first start-of-scan ends the image.
        if data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) > data.find(b"\xff\xda", 0, 1 << 16) >= 0:
            return None
        sos = data.find(b"\xff\xda")
        if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
            return "truncated JPEG (no end-of-image marker after the image data)"
    elif data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
        return "truncated PNG (no IEND chunk)"
    return None


def _item_bytes(item: object) -> bytes | None:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    return None


def _batch_row_bytes(spec: PreprocessSpec) -> int:
    """The image's row of the preprocessed batch tensor (float32), alive with the batch.

    The copies preprocessing makes of one image (colour, resize) are transient, one image at a
    time per slot, and bounded by max_image_pixels through :func:`_check_geometry`.
    """
    H, W = spec.size
    return H * W * spec.channels * 4


def _check_geometry(where: str, header: ImageHeader, max_pixels: int, max_aspect: float,
                    spec: PreprocessSpec | None) -> None:
    h, w = header.oriented_size
    size = f"{w}x{h}"
    if header.pixels > max_pixels:
        raise InvalidArgument(
            f"{where}: image is {header.format} {size} ({header.pixels} pixels, {mib(header.decode_bytes())} "
            f"decoded), more than the model's max_image_pixels {max_pixels}; refused from its header"
        )
    ratio = max(h, w) / min(h, w)
    if spec is not None:
        for what, ih, iw in intermediate_sizes(h, w, spec):
            if ih * iw > max_pixels:
                raise InvalidArgument(
                    f"{where}: image is {size} (aspect ratio {ratio:.0f}:1); {spec.resize} to "
                    f"{spec.size[1]}x{spec.size[0]} would make a {iw}x{ih} {what} image ({ih * iw} pixels), "
                    f"more than the model's max_image_pixels {max_pixels}"
                )
    if ratio > max_aspect:
        raise InvalidArgument(
            f"{where}: image is {size}, aspect ratio {ratio:.1f}:1, more extreme than the model's "
            f"max_aspect_ratio {max_aspect:g}"
        )


def check_item(item: object, index: int, count: int, name: str, max_pixels: int,
               max_aspect: float = float("inf"), spec: PreprocessSpec | None = None) -> CheckedImage:
    """Everything that can be said about one item without decoding it; InvalidArgument if it is refused."""
    where = f"input {name!r}, batch index {index} of {count}"
    data = _item_bytes(item)
    if data is None:
        raise InvalidArgument(f"{where}: expected encoded image bytes, got {type(item).__name__}")
    if not data:
        raise InvalidArgument(f"{where}: empty image (0 bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise InvalidArgument(f"{where}: cannot decode: not a JPEG or PNG file ({len(data)} bytes)")
    try:
        header = read_header(data)
    except ImageHeaderError as exc:
        if fmt in SERVED:
            raise InvalidArgument(f"{where}: cannot decode ({len(data)} bytes): {exc}") from None
        raise InvalidArgument(f"{where}: unsupported format {fmt} (send JPEG or PNG)") from None
    if header.format not in SERVED:
        raise InvalidArgument(
            f"{where}: unsupported format {header.format} ({header.width}x{header.height}, {len(data)} bytes; "
            "send JPEG or PNG)"
        )
    _check_geometry(where, header, max_pixels, max_aspect, spec)
    problem = _truncation(data, header.format)
    if problem is not None:
        raise InvalidArgument(f"{where}: cannot decode: {problem}")
    if header.progressive and (scans := data.count(b"\xff\xda")) > MAX_PROGRESSIVE_SCANS:
        raise InvalidArgument(
            f"{where}: progressive JPEG {header.width}x{header.height} with {scans} scans, more than the "
            f"{MAX_PROGRESSIVE_SCANS} tegrad decodes (encoders write about ten)"
        )
    nbytes = header.decode_bytes() + (_batch_row_bytes(spec) if spec is not None else 0)
    return CheckedImage(where, index, data, header, nbytes)


def check_batch(items: Sequence, config: PreprocessConfig) -> list[CheckedImage]:
    """Every item checked from its header, in batch order (the first refusal is raised)."""
    spec = config.to_spec()
    return [
        check_item(item, i, len(items), config.input, config.max_image_pixels, config.max_aspect_ratio, spec)
        for i, item in enumerate(items)
    ]


def decode_checked(item: CheckedImage) -> DecodedImage:
    try:
        decoded = decode(item.data, item.header)
    except ValueError:
        raise InvalidArgument(
            f"{item.where}: cannot decode ({len(item.data)} bytes): corrupt or zero-sized image"
        ) from None
    if sorted(decoded.image.shape[:2]) != sorted(item.header.oriented_size):
        # A decoder that disagrees with the header it was checked against must not slip past the
        # limits. Either orientation passes: OpenCV also applies EXIF orientation found in a PNG.
        raise InvalidArgument(
            f"{item.where}: corrupt image: decoded {decoded.image.shape[1]}x{decoded.image.shape[0]}, header says "
            f"{item.header.width}x{item.header.height}"
        )
    return decoded


class BatchDecoder:
    """Decodes the checked items of one request, from any thread; after the first failure (or
    :meth:`stop`) the items not yet started are skipped and ``on_skip`` is told about them.

    ``on_image(item, decoded)`` sees every image decoded (the budget holds it, metrics count
    corrupt ones).
    """

    def __init__(self, on_image: Callable[[CheckedImage, DecodedImage], None] | None = None,
                 on_skip: Callable[[CheckedImage], None] | None = None) -> None:
        self._stopped = threading.Event()
        self._on_image, self._on_skip = on_image, on_skip

    def stop(self) -> None:
        self._stopped.set()

    def __call__(self, item: CheckedImage) -> np.ndarray | None:
        if self._stopped.is_set():
            if self._on_skip:
                self._on_skip(item)
            return None
        try:
            decoded = decode_checked(item)
        except BaseException:
            self._stopped.set()
            if self._on_skip:
                self._on_skip(item)
            raise
        if self._stopped.is_set():  # the request failed meanwhile: nobody will read this image
            if self._on_skip:
                self._on_skip(item)
            return None
        if self._on_image:
            self._on_image(item, decoded)
        return decoded.image


def decode_one(item: object, index: int, count: int, name: str, max_pixels: int) -> np.ndarray:
    """One item, checked from its header, then decoded (no preprocessing limits: see check_batch)."""
    return decode_checked(check_item(item, index, count, name, max_pixels)).image


def map_items(pool: Executor | None, fn: Callable, items: Sequence) -> list:
    if pool is None or len(items) < 2:
        return [fn(i, item) for i, item in enumerate(items)]
    # list() re-raises the first failure in batch order, so the message names the first bad index.
    return list(pool.map(fn, range(len(items)), items))


def _items(batch: np.ndarray, name: str) -> list:
    arr = np.asarray(batch, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise InvalidArgument(
            f"input {name!r}: expected a BYTES tensor of shape [N] or [N, 1] with N >= 1 encoded images, "
            f"got shape {list(np.shape(batch))}"
        )
    return list(arr)


def decode_batch(batch: np.ndarray, config: PreprocessConfig, pool: Executor | None = None) -> list[np.ndarray]:
    """A BYTES tensor ``[N]`` or ``[N, 1]`` of JPEG/PNG files to ``N`` BGR uint8 images.

    With a ``pool``, images decode in parallel (the decoders release the GIL).
    """
    checked = check_batch(_items(batch, config.input), config)
    decoder = BatchDecoder()
    return map_items(pool, lambda _, item: decoder(item), checked)


@dataclass(frozen=True)
class RegionFrames:
    """Raw frames (UINT8 ``[N, H, W, 3]``) left in a client's registered shared-memory region.

    ``region`` is a :class:`daemon.server.shared_memory.Region` (``read``, ``mapped``) held by the
    request; ``offset`` is relative to its window. The GPU path reads the frames through the
    mapped window; every other path calls :meth:`read` (one ``preadv``) and gets an array.
    """

    region: object
    offset: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def read(self) -> np.ndarray:
        return self.region.read(self.offset, self.nbytes).reshape(self.shape)

    def frames(self) -> list[FrameInRegion]:
        n, h, w = self.shape[:3]
        return [FrameInRegion(self.region, self.offset + i * h * w * 3, h, w) for i in range(n)]


@dataclass(frozen=True)
class FrameInRegion:
    """One HxWx3 BGR frame at byte ``offset`` of a region's window, not read by the host."""

    region: object
    offset: int
    height: int
    width: int

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3

    def read(self) -> np.ndarray:
        return self.region.read(self.offset, self.nbytes).reshape(self.height, self.width, 3)


def _check_frames(shape: tuple[int, ...], dtype, config: PreprocessConfig) -> None:
    where = f"input {config.input!r}"
    if dtype != np.uint8:
        raise InvalidArgument(f"{where}: raw frames must be UINT8, got {dtype}")
    if len(shape) != 4 or shape[3] != 3:
        raise InvalidArgument(f"{where}: raw frames must have shape [N, H, W, 3] (BGR), got {list(shape)}")
    n, h, w = shape[:3]
    if n == 0 or h == 0 or w == 0:
        raise InvalidArgument(f"{where}: raw frames must not be empty, got shape {list(shape)}")
    if h * w > config.max_image_pixels:
        raise InvalidArgument(
            f"{where}: frames are {w}x{h} ({h * w} pixels), more than the model's max_image_pixels "
            f"{config.max_image_pixels}"
        )
    _check_geometry(where, ImageHeader("raw", w, h), config.max_image_pixels, config.max_aspect_ratio,
                    config.to_spec())


def frames_batch(batch: np.ndarray | RegionFrames, config: PreprocessConfig,
                 in_place: bool = False) -> list[np.ndarray] | list[FrameInRegion]:
    """A UINT8 ``[N, H, W, 3]`` tensor of BGR frames to a list of ``N`` HxWx3 views.

    Frames still in shared memory are checked from their shape alone; with ``in_place`` they
    stay there (for the GPU), else they are read with one copy."""
    if isinstance(batch, RegionFrames):
        _check_frames(batch.shape, np.dtype(np.uint8), config)
        if in_place:
            return batch.frames()
        batch = batch.read()
    arr = np.asarray(batch)
    _check_frames(arr.shape, arr.dtype, config)
    return [arr[i] for i in range(arr.shape[0])]


def load_batch(batch: np.ndarray, config: PreprocessConfig, pool: Executor | None = None) -> list[np.ndarray]:
    """The client tensor, whichever ``format`` the model takes, as BGR uint8 images."""
    if config.format == "encoded":
        return decode_batch(batch, config, pool)
    return frames_batch(batch, config)
