"""A registered shared-memory window, page-locked and mapped into the GPU, feeds the preprocessing
kernel in place and gives the CPU reference's result (and exactly the staged GPU path's).
Skipped with the reason when CUDA or pycuda is absent."""

from __future__ import annotations

import os
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest

from daemon.processing.spec import PreprocessConfig

from .helpers import random_image, smooth_image
from .test_gpu import CASES, compare, kernel_cache  # noqa: F401  (kernel_cache: autouse fixture)

pytestmark = pytest.mark.gpu


@pytest.fixture
def client_region():
    """A POSIX shm object as tritonclient.utils.shared_memory makes one, and a descriptor of it."""
    made = []

    def make(nbytes: int):
        key = f"tegrad_gpu_shm_{uuid.uuid4().hex[:10]}"
        region = shared_memory.SharedMemory(key, create=True, size=nbytes)
        fd = os.open(f"/dev/shm/{key}", os.O_RDWR)
        made.append((region, fd))
        return region, fd

    yield make
    for region, fd in made:
        os.close(fd)
        region.close()
        region.unlink()


@pytest.mark.parametrize("case", ["center-crop-effnet", "letterbox-topleft-yolox", "stretch-nearest-bgr"])
def test_registered_window_feeds_the_kernel_like_the_cpu(case, client_region):
    from daemon.processing.device import MappedHostWindow
    from daemon.processing.gpu import GpuPreprocessor
    from daemon.processing.gpu_shm import run_from_window

    cfg = PreprocessConfig(**CASES[case])
    frames = [random_image(1080, 1920, 0), random_image(37, 53, 1), smooth_image(720, 1280, 2)]
    # The window starts off a page boundary and the frames at odd offsets inside it.
    window_at, gap = 4096 + 100, 13
    offsets, at = [], 0
    for f in frames:
        offsets.append(at)
        at += f.nbytes + gap
    region, fd = client_region(window_at + at)
    for f, off in zip(frames, offsets):
        start = window_at + off
        region.buf[start : start + f.nbytes] = f.tobytes()

    pre = GpuPreprocessor(cfg, max_batch=len(frames))
    window = MappedHostWindow(pre.gpu, fd, window_at, at)
    try:
        layout = [(off, f.shape[0], f.shape[1]) for f, off in zip(frames, offsets)]
        out, transforms = run_from_window(pre, window, layout)
        compare(cfg, frames, out, transforms)
        staged, _ = pre.run(frames)
        np.testing.assert_array_equal(out, staged)

        # The app writes the next frame in place; the kernel sees it without another registration.
        nxt = random_image(1080, 1920, 5)
        region.buf[window_at : window_at + nxt.nbytes] = nxt.tobytes()
        out2, transforms2 = run_from_window(pre, window, layout[:1])
        compare(cfg, [nxt], out2, transforms2)
    finally:
        window.close()
        pre.close()


def test_a_frame_outside_the_window_is_refused_before_the_kernel_runs(client_region):
    from daemon.errors import InvalidArgument
    from daemon.processing.device import MappedHostWindow
    from daemon.processing.gpu import GpuPreprocessor
    from daemon.processing.gpu_shm import run_from_window

    cfg = PreprocessConfig(**CASES["center-crop-effnet"])
    region, fd = client_region(64 * 64 * 3)
    pre = GpuPreprocessor(cfg, max_batch=1)
    window = MappedHostWindow(pre.gpu, fd, 0, 64 * 64 * 3)
    try:
        with pytest.raises(InvalidArgument, match="does not lie inside"):
            run_from_window(pre, window, [(1, 64, 64)])
        out, _ = run_from_window(pre, window, [(0, 64, 64)])
        assert np.isfinite(out).all()
    finally:
        window.close()
        pre.close()
