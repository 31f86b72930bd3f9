"""Triton's system shared-memory extension, driven by tritonclient.grpc and tritonclient.utils.shared_memory
against tegrad in its own process: register, infer from and into regions, status, unregister, and every
misuse answered with the right code while the daemon keeps serving."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import urllib.request
import uuid

import cv2
import numpy as np
import pytest

from tests.interop.conftest import DIGITS

grpcclient = pytest.importorskip("tritonclient.grpc")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException, serialize_byte_tensor  # noqa: E402

SHM_DIR = "/dev/shm"
SLOW_DELAY_US = 4_000_000

FRAMES_CONFIG = """backend = "onnxruntime"
max_batch = 8
instances = 1

[preprocess]
input = "frames"
format = "raw"
size = [8, 8]
resize = "stretch"
interpolation = "area"
color = "GRAY"
scale = 0.00392156862745098
layout = "NCHW"

[postprocess]
kind = "classification"
top_k = 3
softmax = true
labels = "labels.txt"
"""


def _digits(n: int, seed: int = 0) -> np.ndarray:
    """``n`` held-out digits (pixel / 16) from ``seed`` on, as the model's FP32 [N,1,8,8] input."""
    x = np.load(DIGITS / "data" / "heldout.npz")["x"]
    return np.ascontiguousarray(x[seed : seed + n].reshape(n, 1, 8, 8).astype(np.float32))


@pytest.fixture(scope="module")
def shm_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    ignore = shutil.ignore_patterns("data", "README.md")
    shutil.copytree(DIGITS, root / "digits", ignore=ignore)
    shutil.copytree(DIGITS, root / "frames", ignore=ignore)
    (root / "frames" / "config.toml").write_text(FRAMES_CONFIG)
    # One request waits SLOW_DELAY_US in the queue for company: it is in flight long enough to
    # unregister its region under it (waited for on the queue-depth metric, not by sleeping).
    shutil.copytree(DIGITS, root / "slow", ignore=ignore)
    config = (DIGITS / "config.toml").read_text()
    (root / "slow" / "config.toml").write_text(
        config.replace("max_queue_delay_us = 0", f"max_queue_delay_us = {SLOW_DELAY_US}"))
    return root


@pytest.fixture(scope="module")
def shm_server(shm_repo, tmp_path_factory):
    from tests.interop.conftest import start_server

    server = start_server(repository=shm_repo, state_dir=tmp_path_factory.mktemp("state"),
                          args=("--allow-shared-memory", "--shared-memory-max-regions", "6",
                                "--shared-memory-max-mb", "16"))
    yield server
    rc = server.stop()
    assert rc == 0, server.log()


@pytest.fixture
def client(shm_server):
    c = grpcclient.InferenceServerClient(shm_server.url)
    yield c
    c.unregister_system_shared_memory()
    c.close()


class Regions:
    """Shared-memory objects this test created, destroyed (and unlinked) at the end."""

    def __init__(self) -> None:
        self.handles: list = []

    def create(self, nbytes: int, prefix: str = "t"):
        key = f"/tegrad_test_{prefix}_{uuid.uuid4().hex[:10]}"
        handle = shm.create_shared_memory_region(key[1:], key, nbytes)
        self.handles.append(handle)
        return key, handle

    def close(self) -> None:
        for h in self.handles:
            try:
                shm.destroy_shared_memory_region(h)
            except Exception:  # already destroyed by the test itself
                pass


@pytest.fixture
def regions():
    r = Regions()
    yield r
    r.close()


def _code(exc_info) -> str:
    return exc_info.value.status()


def _digits_known_good(client, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("digits", [inp]).as_numpy("logits")


def _shm_input(name, datatype, shape, region, nbytes, offset=0):
    inp = grpcclient.InferInput(name, list(shape), datatype)
    inp.set_shared_memory(region, nbytes, offset)
    return inp


def _shm_output(name, region, nbytes, offset=0):
    out = grpcclient.InferRequestedOutput(name)
    out.set_shared_memory(region, nbytes, offset)
    return out


def _daemon_holds(server, key: str) -> bool:
    """Whether the daemon process has the shared memory object ``key`` open."""
    target = os.path.join(SHM_DIR, key[1:])
    fds = f"/proc/{server.proc.pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(os.path.join(fds, fd)).startswith(target):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _metric(server, line_re: str) -> float | None:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    m = re.search(line_re + r" ([0-9.e+-]+)", text)
    return float(m.group(1)) if m else None


# --------------------------------------------------------------------------- happy paths


def test_server_metadata_lists_system_shared_memory(client):
    assert "system_shared_memory" in client.get_server_metadata().extensions


def test_digits_tensor_in_and_out_of_shared_memory_equals_the_bytes_path(client, regions):
    x = _digits(4)
    expected = _digits_known_good(client, x)
    out_bytes = expected.nbytes
    in_key, in_h = regions.create(x.nbytes, "in")
    out_key, out_h = regions.create(4096, "out")
    shm.set_shared_memory_region(in_h, [x])
    client.register_system_shared_memory("digits_in", in_key, x.nbytes)
    client.register_system_shared_memory("digits_out", out_key, 4096)

    result = client.infer("digits", [_shm_input("input", "FP32", x.shape, "digits_in", x.nbytes)],
                          outputs=[_shm_output("logits", "digits_out", 4096)])

    out = result.get_output("logits")
    assert out.datatype == "FP32" and list(out.shape) == [4, 10]
    assert result.get_response().raw_output_contents[0] == b"", "an output in shared memory travels without bytes"
    got = shm.get_contents_as_numpy(out_h, np.float32, [4, 10])
    np.testing.assert_array_equal(got, expected)
    assert out_bytes == 160


def test_offsets_within_one_region_for_input_and_output(client, regions):
    x = _digits(2, seed=3)
    expected = _digits_known_good(client, x)
    key, h = regions.create(8192, "both")
    shm.set_shared_memory_region(h, [x], offset=1000)
    client.register_system_shared_memory("both", key, 8000, offset=100)  # window [100, 8100) of the object
    result = client.infer("digits", [_shm_input("input", "FP32", x.shape, "both", x.nbytes, offset=900)],
                          outputs=[_shm_output("logits", "both", 80, offset=4000)])
    assert result.get_response().raw_output_contents[0] == b""
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h, np.float32, [2, 10], offset=4100), expected)


def test_mixed_request_shared_memory_input_and_bytes_output(client, regions):
    x = _digits(3, seed=5)
    key, h = regions.create(x.nbytes, "mixed")
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory("mixed", key, x.nbytes)
    result = client.infer("digits", [_shm_input("input", "FP32", x.shape, "mixed", x.nbytes)])
    np.testing.assert_array_equal(result.as_numpy("logits"), _digits_known_good(client, x))


def test_stream_requests_use_shared_memory_too(client, regions):
    import queue

    x = _digits(2, seed=9)
    expected = _digits_known_good(client, x)
    key, h = regions.create(4096, "stream")
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory("stream", key, 4096)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("digits", [_shm_input("input", "FP32", x.shape, "stream", x.nbytes)],
                                  outputs=[_shm_output("logits", "stream", 80, offset=2048)], request_id="ok")
        client.async_stream_infer("digits", [_shm_input("input", "FP32", x.shape, "absent", x.nbytes)],
                                  request_id="bad")
        got = dict((r.get_response().id if r is not None else "bad", (r, e)) for r, e in
                   (answers.get(timeout=30), answers.get(timeout=30)))
    finally:
        client.stop_stream()
    assert got["ok"][1] is None and "absent" in str(got["bad"][1])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h, np.float32, [2, 10], offset=2048), expected)


def _png_digits(n: int) -> list[bytes]:
    x = _digits(n, seed=7)
    return [cv2.imencode(".png", np.clip(img[0] * 255, 0, 255).astype(np.uint8))[1].tobytes() for img in x]


def test_encoded_images_from_shared_memory_equal_the_bytes_path(client, regions):
    images = np.array(_png_digits(3), dtype=np.object_)
    by_bytes = grpcclient.InferInput("image", [3], "BYTES")
    by_bytes.set_data_from_numpy(images)
    expected = client.infer("digits", [by_bytes]).as_numpy("logits")

    payload = serialize_byte_tensor(images)  # a 0-d object array holding the framed bytes
    size = len(payload.item())
    key, h = regions.create(size, "png")
    shm.set_shared_memory_region(h, [payload])
    client.register_system_shared_memory("png", key, size)
    result = client.infer("digits", [_shm_input("image", "BYTES", [3], "png", size)])
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)


def _frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    x = _digits(n, seed=11)
    grey = [cv2.resize(np.clip(img[0] * 255, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            for img in x]
    return np.ascontiguousarray(np.stack([cv2.cvtColor(g, cv2.COLOR_GRAY2BGR) for g in grey]))


def test_raw_frames_and_all_outputs_in_shared_memory_equal_the_bytes_path(client, regions):
    frames = _frames(2)
    by_bytes = grpcclient.InferInput("frames", list(frames.shape), "UINT8")
    by_bytes.set_data_from_numpy(frames)
    expected = client.infer("frames", [by_bytes])

    in_key, in_h = regions.create(frames.nbytes, "frames")
    out_key, out_h = regions.create(4096, "fout")
    shm.set_shared_memory_region(in_h, [frames])
    client.register_system_shared_memory("frames_in", in_key, frames.nbytes)
    client.register_system_shared_memory("frames_out", out_key, 4096)
    labels_bytes = len(serialize_byte_tensor(expected.as_numpy("labels").reshape(-1)).item())
    result = client.infer(
        "frames", [_shm_input("frames", "UINT8", frames.shape, "frames_in", frames.nbytes)],
        outputs=[_shm_output("scores", "frames_out", 24, 0), _shm_output("classes", "frames_out", 24, 64),
                 _shm_output("labels", "frames_out", 1024, 128)])

    assert all(raw == b"" for raw in result.get_response().raw_output_contents)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.float32, [2, 3]), expected.as_numpy("scores"))
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.int32, [2, 3], offset=64),
                                  expected.as_numpy("classes"))
    labels = shm.get_contents_as_numpy(out_h, np.object_, [2, 3], offset=128)
    np.testing.assert_array_equal(labels, expected.as_numpy("labels"))
    assert labels_bytes <= 1024


# --------------------------------------------------------------------------- status and unregister


def test_status_lists_regions_and_unregister_one_then_all(client, shm_server, regions):
    key_a, _ = regions.create(1024, "a")
    key_b, _ = regions.create(2048, "b")
    client.register_system_shared_memory("a", key_a, 1000, offset=24)
    client.register_system_shared_memory("b", key_b, 2048)

    status = client.get_system_shared_memory_status()
    listed = {r.name: (r.key, r.offset, r.byte_size) for r in status.regions.values()}
    assert listed == {"a": (key_a, 24, 1000), "b": (key_b, 0, 2048)}
    assert set(client.get_system_shared_memory_status("b").regions) == {"b"}
    assert _metric(shm_server, r"tegrad_shared_memory_regions") == 2
    assert _metric(shm_server, r"tegrad_shared_memory_bytes") == 3048

    client.unregister_system_shared_memory("a")
    assert set(client.get_system_shared_memory_status().regions) == {"b"}
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status("a")
    assert _code(e) == "StatusCode.NOT_FOUND" and "'a'" in e.value.message()
    client.unregister_system_shared_memory("never-registered")  # as in Triton: nothing to do, no error

    client.unregister_system_shared_memory()  # empty name: all of them
    assert len(client.get_system_shared_memory_status().regions) == 0
    assert _metric(shm_server, r"tegrad_shared_memory_regions") == 0


# --------------------------------------------------------------------------- registration misuse


def test_registration_misuse_is_refused_and_harms_nothing(client, regions):
    x = _digits(1)
    key, _ = regions.create(1024, "reg")
    client.register_system_shared_memory("reg", key, 1024)
    cases = [
        (("reg", key, 512), "StatusCode.ALREADY_EXISTS", "already in manager"),
        (("other", "/tegrad_test_missing_" + uuid.uuid4().hex, 16), "StatusCode.NOT_FOUND", "no shared memory object"),
        (("other", "/../etc/passwd", 16), "StatusCode.INVALID_ARGUMENT", "not a POSIX shared memory name"),
        (("other", "/a/b", 16), "StatusCode.INVALID_ARGUMENT", "not a POSIX shared memory name"),
        (("other", key, 1024, 1), "StatusCode.INVALID_ARGUMENT", "beyond the end"),
        (("other", key, 0), "StatusCode.INVALID_ARGUMENT", "byte_size must be at least 1"),
        (("other", key, 17 << 20), "StatusCode.RESOURCE_EXHAUSTED", "--shared-memory-max-mb"),
    ]
    for args, code, text in cases:
        with pytest.raises(InferenceServerException) as e:
            client.register_system_shared_memory(*args)
        assert _code(e) == code, (args, e.value)
        assert text in e.value.message(), (args, e.value.message())
    assert set(client.get_system_shared_memory_status().regions) == {"reg"}
    for i in range(5):  # the server takes 6
        client.register_system_shared_memory(f"extra{i}", key, 16)
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory("one-too-many", key, 16)
    assert _code(e) == "StatusCode.RESOURCE_EXHAUSTED" and "--shared-memory-max-regions" in e.value.message()
    assert _digits_known_good(client, x).shape == (1, 10)


# --------------------------------------------------------------------------- inference misuse


def _misuse_cases(x_bytes: int):
    shape = [1, 1, 8, 8]
    return {
        "unknown region": (
            [_shm_input("input", "FP32", shape, "nope", x_bytes)], None, "StatusCode.NOT_FOUND", "nope"),
        "offset beyond the region": (
            [_shm_input("input", "FP32", shape, "in", x_bytes, offset=4096)], None,
            "StatusCode.INVALID_ARGUMENT", "Invalid offset"),
        "offset + size beyond the region": (
            [_shm_input("input", "FP32", shape, "in", x_bytes, offset=4096 - 8)], None,
            "StatusCode.INVALID_ARGUMENT", "Invalid offset + byte size"),
        "size unlike the tensor": (
            [_shm_input("input", "FP32", shape, "in", x_bytes - 4)], None,
            "StatusCode.INVALID_ARGUMENT", "needs 256 bytes"),
        "output overlaps the input": (
            [_shm_input("input", "FP32", shape, "in", x_bytes)], [_shm_output("logits", "in", 40, offset=200)],
            "StatusCode.INVALID_ARGUMENT", "overlaps input 'input'"),
        "output window too small": (
            [_shm_input("input", "FP32", shape, "in", x_bytes)], [_shm_output("logits", "out", 39)],
            "StatusCode.INVALID_ARGUMENT", "more than the 39 bytes"),
        "output with classification": (
            [_shm_input("input", "FP32", shape, "in", x_bytes)], "classification",
            "StatusCode.INVALID_ARGUMENT", "can't set both"),
    }


@pytest.mark.parametrize("case", list(_misuse_cases(256)))
def test_inference_misuse_is_refused_and_the_next_request_is_served(client, regions, case):
    x = _digits(1, seed=2)
    expected = _digits_known_good(client, x)
    in_key, in_h = regions.create(4096, "min")
    out_key, out_h = regions.create(4096, "mout")
    shm.set_shared_memory_region(in_h, [x])
    shm.set_shared_memory_region(out_h, [np.full(1024, 7, np.uint8)])
    client.register_system_shared_memory("in", in_key, 4096)
    client.register_system_shared_memory("out", out_key, 4096)
    inputs, outputs, code, text = _misuse_cases(x.nbytes)[case]
    if outputs == "classification":
        # tritonclient refuses this locally; a client of its own could still send it.
        out = _shm_output("logits", "out", 64)
        out._output.parameters["classification"].int64_param = 3
        outputs = [out]
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", inputs, outputs=outputs)
    assert _code(e) == code, e.value
    assert text in e.value.message(), e.value.message()

    # Unharmed: the regions, their contents and the next request (from shared memory too).
    assert set(client.get_system_shared_memory_status().regions) == {"in", "out"}
    if case != "output window too small":  # that one fails after the model ran, like Triton's
        assert (shm.get_contents_as_numpy(out_h, np.uint8, [1024]) == 7).all()
    np.testing.assert_array_equal(shm.get_contents_as_numpy(in_h, np.float32, [1, 1, 8, 8]), x)
    result = client.infer("digits", [_shm_input("input", "FP32", x.shape, "in", x.nbytes)],
                          outputs=[_shm_output("logits", "out", 40)])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.float32, [1, 10]), expected)
    assert result.get_output("logits") is not None


def test_unregister_during_use_finishes_the_request_then_frees_the_name(client, shm_server, regions):
    x = _digits(1, seed=4)
    expected = _digits_known_good(client, x)
    key, h = regions.create(4096, "busy")
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory("busy", key, 4096)
    done = threading.Event()
    box: dict = {}

    def callback(result, error):
        box["result"], box["error"] = result, error
        done.set()

    client.async_infer("slow", [_shm_input("input", "FP32", x.shape, "busy", x.nbytes)], callback,
                       outputs=[_shm_output("logits", "busy", 40, offset=1024)])
    deadline = time.monotonic() + SLOW_DELAY_US / 1e6
    while _metric(shm_server, r'tegrad_queue_depth\{model="slow",version="1"\}') != 1:
        assert time.monotonic() < deadline and not done.is_set(), "the request never waited in the queue"
    client.unregister_system_shared_memory("busy")
    assert "busy" not in client.get_system_shared_memory_status().regions
    assert _daemon_holds(shm_server, key), "the in-flight request lost its region"
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [_shm_input("input", "FP32", x.shape, "busy", x.nbytes)])
    assert _code(e) == "StatusCode.NOT_FOUND"
    assert not done.is_set(), "the slow request finished before the unregister could overlap it"

    assert done.wait(60), "the in-flight request never finished"
    assert box["error"] is None, box["error"]
    assert not _daemon_holds(shm_server, key), "the last user let go, so the region must be closed"
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h, np.float32, [1, 10], offset=1024), expected)
    client.register_system_shared_memory("busy", key, 4096)  # the name is free again
    result = client.infer("digits", [_shm_input("input", "FP32", x.shape, "busy", x.nbytes)])
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)


def test_region_removed_or_shrunk_by_the_client_never_harms_the_daemon(client, regions):
    x = _digits(1, seed=6)
    expected = _digits_known_good(client, x)
    key, h = regions.create(4096, "gone")
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory("shrunk", key, 4096)
    os.truncate(os.path.join(SHM_DIR, key[1:]), 16)  # the owner shrinks it below the window
    for outputs in (None, [_shm_output("logits", "shrunk", 40, offset=2048)]):
        with pytest.raises(InferenceServerException) as e:
            client.infer("digits", [_shm_input("input", "FP32", x.shape, "shrunk", x.nbytes)], outputs=outputs)
        assert _code(e) == "StatusCode.INVALID_ARGUMENT" and "shrank" in e.value.message(), e.value.message()
    np.testing.assert_array_equal(_digits_known_good(client, x), expected)

    key2, h2 = regions.create(4096, "removed")
    shm.set_shared_memory_region(h2, [x])
    client.register_system_shared_memory("removed", key2, 4096)
    shm.destroy_shared_memory_region(h2)  # unmapped and unlinked by the client
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [_shm_input("input", "FP32", x.shape, "removed", x.nbytes)])
    assert _code(e) == "StatusCode.NOT_FOUND" and "removed by its owner" in e.value.message()
    np.testing.assert_array_equal(_digits_known_good(client, x), expected)
    client.unregister_system_shared_memory("removed")
    client.unregister_system_shared_memory("shrunk")
    assert len(client.get_system_shared_memory_status().regions) == 0


# --------------------------------------------------------------------------- disabled / CUDA


def test_a_server_without_the_flag_refuses_shared_memory(digits_server, regions):
    c = grpcclient.InferenceServerClient(digits_server.url)
    try:
        assert "system_shared_memory" not in c.get_server_metadata().extensions
        x = _digits(1)
        key, h = regions.create(x.nbytes, "off")
        shm.set_shared_memory_region(h, [x])
        for call in (lambda: c.register_system_shared_memory("off", key, x.nbytes),
                     lambda: c.get_system_shared_memory_status(),
                     lambda: c.unregister_system_shared_memory(),
                     lambda: c.infer("digits", [_shm_input("input", "FP32", x.shape, "off", x.nbytes)])):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert _code(e) == "StatusCode.UNIMPLEMENTED" and "--allow-shared-memory" in e.value.message()
        assert _digits_known_good(c, x).shape == (1, 10)
    finally:
        c.close()


def test_cuda_shared_memory_is_unimplemented_with_the_reason(client):
    for call in (lambda: client.get_cuda_shared_memory_status(),
                 lambda: client.register_cuda_shared_memory("cuda", b"\0" * 64, 0, 64),
                 lambda: client.unregister_cuda_shared_memory()):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert _code(e) == "StatusCode.UNIMPLEMENTED"
        assert "system shared memory" in e.value.message() and "CUDA IPC" in e.value.message()
