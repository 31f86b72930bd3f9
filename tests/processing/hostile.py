"""Hostile images made cheaply, without ever holding their pixels: what an attacker would send.

``bomb_png`` and ``bomb_jpeg`` are real, decodable files (OpenCV decodes them to one flat colour),
written by hand so that the test process never allocates the gigabytes they expand to.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit grey PNG of one colour: 20000x20000 is about 48 KB, 30000x30000 about 109 KB."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter type 0, then black pixels
    z = zlib.compressobj(9)
    parts = []
    rows_per_chunk = max(1, (1 << 20) // len(row))
    chunk = row * rows_per_chunk
    left = height
    while left:
        n = min(left, rows_per_chunk)
        parts.append(z.compress(chunk if n == rows_per_chunk else row * n))
        left -= n
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def bomb_jpeg(width: int, height: int, progressive: bool = False) -> bytes:
    """A baseline greyscale JPEG of one colour (mid grey): 20000x20000 is about 4.7 MB.

    Each 8x8 block is a DC difference of 0 (code ``00``) and an end-of-block (code ``0000``):
    6 zero bits, so the entropy-coded data is all zero bytes. ``progressive`` only marks the
    frame SOF2 (the header is what is being tested; such a file does not decode).
    """
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    bits = blocks * 6
    scan = b"\x00" * (bits // 8) + (bytes([0xFF >> (bits % 8)]) if bits % 8 else b"")
    scan = scan.replace(b"\xff", b"\xff\x00")
    dqt = _segment(0xDB, b"\x00" + b"\x01" * 64)
    sof = _segment(0xC2 if progressive else 0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    # One symbol per table: DC category 0 as a 2-bit code, AC end-of-block as a 4-bit code.
    dht = _segment(0xC4, b"\x00" + bytes([0, 1] + [0] * 14) + b"\x00"
                   + b"\x10" + bytes([0, 0, 0, 1] + [0] * 12) + b"\x00")
    sos = _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    return b"\xff\xd8" + dqt + sof + dht + sos + scan + b"\xff\xd9"


def strip_png(width: int = 20000, height: int = 1) -> bytes:
    """A thin strip (157 bytes at 20000x1): harmless itself, huge once its short side is resized up."""
    return cv2.imencode(".png", np.full((height, width), 200, np.uint8))[1].tobytes()


def truncated_jpeg_with_eoi(image: np.ndarray) -> bytes:
    """The first half of a real JPEG with an end-of-image marker appended: libjpeg decodes it,
    filling the missing rows, and only warns."""
    data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    return data[: len(data) // 2] + b"\xff\xd9"


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_rss(pid: int, fn):
    """(fn(), bytes of resident memory process ``pid`` gained at its peak while fn ran).

    The peak is the kernel's VmHWM, reset first through /proc/<pid>/clear_refs; where that is not
    allowed, VmRSS is sampled every millisecond instead (which can miss a short spike).
    """
    import threading

    before = status_kb(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        sampled = None
    except OSError:
        sampled = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.001):
                sampled.append(status_kb(pid, "VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        result = fn()
    finally:
        if sampled is not None:
            done.set()
            sampler.join()
    peak = max(sampled) if sampled is not None else status_kb(pid, "VmHWM")
    return result, max(0, peak - before) * 1024
