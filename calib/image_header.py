"""What an encoded image claims to be, read from its header before a single pixel is decoded.

A 48 KB PNG of one colour can claim 20000x20000 pixels: decoding it first and checking its
size afterwards costs gigabytes. :func:`read_header` reads the dimensions (and the channels, bit
depth and coding process where they change the memory a decoder needs) from the container:

- PNG: the IHDR chunk;
- JPEG: the first SOFn frame header, walking the marker segments (baseline, extended,
  progressive, lossless; EXIF orientation from APP1 on the way);
- WebP: the VP8 (lossy), VP8L (lossless) or VP8X (extended) chunk;
- BMP: the DIB header (core or info); TIFF: the first IFD; GIF: the logical screen.

Every malformed or truncated header raises :class:`ImageHeaderError` (a ``ValueError``) with a
sentence that names the format and what is wrong; nothing else escapes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Recognised by name only: the size is not read.
_NAMED = {b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD", b"\x00\x00\x00\x0cjP  ": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000"}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# JPEG markers without a length field: TEM, RSTn, SOI (EOI ends the walk).
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8}
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_EXIF_ORIENTATION = 0x0112
# Walking a header is Python code on the request path: bounded, so that 64 MB of tiny segments
# or fill bytes cannot make it cost seconds. Real files stay far below (tags sort ascending, and
# width and height are among the first).
_MAX_JPEG_SEGMENTS = 4096
_MAX_IFD_ENTRIES = 512


class ImageHeaderError(ValueError):
    """The data is not an image whose header can be read; the message says why."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"
    width: int
    height: int
    channels: int = 3
    bit_depth: int = 8
    progressive: bool = False  # JPEG: decoders keep every coefficient of the image until the last scan
    # JPEG: sum over components of (h_i * v_i) / (h_max * v_max): samples per pixel actually coded.
    coded_samples: float = 3.0
    orientation: int = 1  # EXIF orientation (1-8; 5-8 swap width and height when applied)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(height, width) of the image once its EXIF orientation is applied, as OpenCV does."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)

    def decode_bytes(self) -> int:
        """Peak memory to decode it to 8-bit BGR: the output, plus a progressive JPEG's
        coefficient buffer (2 bytes per coded sample, all scans at once)."""
        out = self.pixels * 3
        if self.format == "JPEG" and self.progressive:
            out += math.ceil(self.pixels * self.coded_samples) * 2
        return out

    def describe(self) -> str:
        return f"{self.format} {self.width}x{self.height}"


def _u16be(data: bytes, at: int) -> int:
    return struct.unpack_from(">H", data, at)[0]


def _need(data: bytes, end: int, what: str) -> None:
    if len(data) < end:
        raise ImageHeaderError(f"truncated {what} header ({len(data)} bytes)")


def _positive(fmt: str, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageHeaderError(f"zero-sized image: the {fmt} header says {width}x{height}")


def _png(data: bytes) -> ImageHeader:
    _need(data, 33, "PNG")
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise ImageHeaderError("corrupt PNG: the first chunk is not a 13-byte IHDR")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
        raise ImageHeaderError(f"corrupt PNG: dimensions {width}x{height} exceed the format's 2^31-1")
    _positive("PNG", width, height)
    if colour not in _PNG_CHANNELS or depth not in _PNG_DEPTHS[colour]:
        raise ImageHeaderError(f"corrupt PNG: colour type {colour} with bit depth {depth} is not valid")
    return ImageHeader("PNG", width, height, _PNG_CHANNELS[colour], depth)


def _tiff_ifd0(data: bytes, base: int, what: str) -> dict[int, tuple[int, ...]]:
    """Tag -> values of the first IFD of the TIFF structure at ``data[base:]`` (integer types only)."""
    _need(data, base + 8, what)
    order = data[base:base + 2]
    if order not in (b"II", b"MM"):
        raise ImageHeaderError(f"corrupt {what}: byte order mark {order!r} is neither II nor MM")
    e = "<" if order == b"II" else ">"
    magic, offset = struct.unpack_from(e + "HI", data, base + 2)
    if magic == 43:
        raise ImageHeaderError(f"{what} is a BigTIFF, whose header tegrad does not read")
    if magic != 42:
        raise ImageHeaderError(f"corrupt {what}: magic number {magic} is not 42")
    ifd = base + offset
    _need(data, ifd + 2, what)
    count = struct.unpack_from(e + "H", data, ifd)[0]
    _need(data, ifd + 2 + 12 * count, what)
    sizes = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4)}  # BYTE, SHORT, LONG
    tags: dict[int, tuple[int, ...]] = {}
    for i in range(min(count, _MAX_IFD_ENTRIES)):
        tag, kind, n, _ = struct.unpack_from(e + "HHII", data, ifd + 2 + 12 * i)
        if kind not in sizes or n == 0 or n > 64:
            continue
        code, size = sizes[kind]
        at = ifd + 2 + 12 * i + 8
        if n * size > 4:
            at = base + struct.unpack_from(e + "I", data, at)[0]
            if at + n * size > len(data):
                continue
        tags[tag] = struct.unpack_from(e + code * n, data, at)
    return tags


def _tiff(data: bytes) -> ImageHeader:
    tags = _tiff_ifd0(data, 0, "TIFF")
    if 256 not in tags or 257 not in tags:
        raise ImageHeaderError("corrupt TIFF: the first image directory has no width or height")
    width, height = tags[256][0], tags[257][0]
    _positive("TIFF", width, height)
    samples = tags.get(277, (1,))[0]
    depth = max(tags.get(258, (1,)))
    return ImageHeader("TIFF", width, height, max(1, samples), depth)


def _exif_orientation(segment: bytes) -> int:
    if not segment.startswith(b"Exif\x00\x00"):
        return 1
    try:
        value = _tiff_ifd0(segment, 6, "EXIF").get(_EXIF_ORIENTATION, (1,))[0]
    except (ImageHeaderError, struct.error):
        return 1  # an unreadable EXIF block is ignored, as decoders do
    return value if 1 <= value <= 8 else 1


def _jpeg(data: bytes) -> ImageHeader:
    at, orientation = 2, 1
    for _ in range(_MAX_JPEG_SEGMENTS):
        _need(data, at + 2, "JPEG")
        if data[at] != 0xFF:
            raise ImageHeaderError(f"corrupt JPEG: expected a marker at byte {at}, found 0x{data[at]:02x}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):
            raise ImageHeaderError("corrupt JPEG: no frame header (SOF) before the image data")
        _need(data, at + 4, "JPEG")
        length = _u16be(data, at + 2)
        if length < 2:
            raise ImageHeaderError(f"corrupt JPEG: marker 0x{marker:02x} has segment length {length}")
        if marker in _JPEG_SOF:
            _need(data, at + 10, "JPEG")
            depth, height, width, ncomp = struct.unpack_from(">BHHB", data, at + 4)
            if height == 0:
                raise ImageHeaderError("JPEG with its height defined later (DNL marker) is not supported")
            _positive("JPEG", width, height)
            if ncomp == 0 or length < 8 + 3 * ncomp:
                raise ImageHeaderError(f"corrupt JPEG: frame header with {ncomp} components in {length} bytes")
            _need(data, at + 10 + 3 * ncomp, "JPEG")
            factors = [(data[at + 11 + 3 * i] >> 4, data[at + 11 + 3 * i] & 15) for i in range(ncomp)]
            if any(h == 0 or v == 0 for h, v in factors):
                raise ImageHeaderError("corrupt JPEG: a component has sampling factor 0")
            hmax, vmax = max(h for h, _ in factors), max(v for _, v in factors)
            coded = sum(h * v for h, v in factors) / (hmax * vmax)
            return ImageHeader("JPEG", width, height, ncomp, depth, marker in _JPEG_PROGRESSIVE, coded, orientation)
        if marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(data[at + 4:at + 2 + length])
        at += 2 + length
    raise ImageHeaderError(f"corrupt JPEG: no frame header (SOF) in the first {_MAX_JPEG_SEGMENTS} markers")


def _webp(data: bytes) -> ImageHeader:
    _need(data, 30, "WEBP")
    kind = data[12:16]
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageHeaderError("corrupt WEBP: the VP8 frame has no start code")
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
        channels = 3
    elif kind == b"VP8L":
        if data[20] != 0x2F:
            raise ImageHeaderError("corrupt WEBP: the VP8L stream has no signature byte")
        bits = struct.unpack_from("<I", data, 21)[0]
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        channels = 4 if bits >> 28 & 1 else 3
    elif kind == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        channels = 4 if data[20] & 0x10 else 3
    else:
        raise ImageHeaderError(f"corrupt WEBP: first chunk {kind!r} is none of VP8, VP8L, VP8X")
    _positive("WEBP", width, height)
    return ImageHeader("WEBP", width, height, channels)


def _bmp(data: bytes) -> ImageHeader:
    _need(data, 26, "BMP")
    size = struct.unpack_from("<I", data, 14)[0]
    if size == 12:
        width, height, _, depth = struct.unpack_from("<HHHH", data, 18)
    elif size >= 40:
        _need(data, 30, "BMP")
        width, height, _, depth = struct.unpack_from("<iiHH", data, 18)
        height = abs(height)  # negative: rows stored top-down
    else:
        raise ImageHeaderError(f"corrupt BMP: DIB header of {size} bytes")
    _positive("BMP", width, height)
    return ImageHeader("BMP", width, height, 4 if depth == 32 else 3, depth)


def _gif(data: bytes) -> ImageHeader:
    _need(data, 10, "GIF")
    width, height = struct.unpack_from("<HH", data, 6)
    _positive("GIF", width, height)
    return ImageHeader("GIF", width, height, 3, 8)


def sniff(data: bytes) -> str | None:
    """The format name the leading bytes announce, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    for magic, name in _NAMED.items():
        if data.startswith(magic):
            return name
    return None


_READERS = {"JPEG": _jpeg, "PNG": _png, "WEBP": _webp, "BMP": _bmp, "TIFF": _tiff, "GIF": _gif}
#: Formats whose header :func:`read_header` reads.
READABLE = frozenset(_READERS)


def read_header(data: bytes | bytearray | memoryview) -> ImageHeader:
    """The header of an encoded image; :class:`ImageHeaderError` if it is not one that can be read."""
    if not isinstance(data, bytes):
        data = bytes(data)
    name = sniff(data)
    if name is None:
        raise ImageHeaderError("not an image file of a known format (JPEG, PNG, WEBP, BMP, TIFF, GIF)")
    if name not in _READERS:
        raise ImageHeaderError(f"{name} file, whose header tegrad does not read")
    try:
        return _READERS[name](data)
    except struct.error:  # a field ran past the end of the data
        raise ImageHeaderError(f"truncated {name} header ({len(data)} bytes)") from None

