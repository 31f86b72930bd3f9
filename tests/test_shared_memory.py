"""The shared-memory registry on real POSIX shm objects (/dev/shm): lifetime, bounds, keys, limits.
The gRPC side, with tritonclient, is in tests/interop/test_shared_memory.py."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from daemon.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unimplemented
from daemon.protogen import grpc_service_pb2 as pb
from daemon.server.shared_memory import NO_REGIONS, Limits, SharedMemoryRegistry


@pytest.fixture
def objects():
    """Creates shm objects (key -> path) and removes them afterwards."""
    made = []

    def make(data: bytes) -> str:
        key = f"/tegrad_unit_{uuid.uuid4().hex[:10]}"
        path = "/dev/shm" + key
        with open(path, "wb") as f:
            f.write(data)
        made.append(path)
        return key

    yield make
    for path in made:
        if os.path.exists(path):
            os.unlink(path)


def _request(inputs=(), outputs=()) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    for name, region, offset, size in inputs:
        t = req.inputs.add(name=name, datatype="UINT8", shape=[size])
        t.parameters["shared_memory_region"].string_param = region
        t.parameters["shared_memory_offset"].int64_param = offset
        t.parameters["shared_memory_byte_size"].int64_param = size
    for name, region, offset, size in outputs:
        t = req.outputs.add(name=name)
        t.parameters["shared_memory_region"].string_param = region
        t.parameters["shared_memory_offset"].int64_param = offset
        t.parameters["shared_memory_byte_size"].int64_param = size
    return req


def test_a_request_without_shared_memory_costs_nothing():
    reg = SharedMemoryRegistry(enabled=False)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[1])
    assert reg.attach(req) is NO_REGIONS


def test_disabled_registry_refuses_every_use(objects):
    reg = SharedMemoryRegistry(enabled=False)
    key = objects(b"x" * 16)
    for call in (lambda: reg.register("r", key, 0, 16), lambda: reg.status(), lambda: reg.unregister(),
                 lambda: reg.attach(_request(inputs=[("x", "r", 0, 4)]))):
        with pytest.raises(Unimplemented, match="--allow-shared-memory"):
            call()


def test_reads_the_window_and_writes_outputs_into_it(objects):
    reg = SharedMemoryRegistry(enabled=True)
    key = objects(bytes(range(256)))
    reg.register("r", key, 16, 128)  # window = object bytes 16..143
    io = reg.attach(_request(inputs=[("x", "r", 4, 8)], outputs=[("y", "r", 64, 4)]))
    try:
        np.testing.assert_array_equal(io.inputs["x"], np.arange(20, 28, dtype=np.uint8))
        io.outputs["y"].write(np.array([1, 2, 3, 4], np.uint8))
        with pytest.raises(InvalidArgument, match="more than the 4 bytes"):
            io.outputs["y"].write(b"12345")
    finally:
        io.release()
    with open("/dev/shm" + key, "rb") as f:
        assert f.read()[80:84] == bytes([1, 2, 3, 4])


def test_unregister_during_use_closes_after_the_last_user(objects):
    reg = SharedMemoryRegistry(enabled=True)
    key = objects(b"\0" * 64)
    region = reg.register("r", key, 0, 64)
    a = reg.attach(_request(inputs=[("x", "r", 0, 8)]))
    b = reg.attach(_request(outputs=[("y", "r", 8, 8)]))
    reg.unregister("r")
    assert reg.status() == [] and not region.closed
    with pytest.raises(NotFound, match="'r'"):
        reg.attach(_request(inputs=[("x", "r", 0, 8)]))
    reg.register("r", key, 0, 32)  # the name is free at once
    a.release()
    assert not region.closed
    b.outputs["y"].write(b"abcdefgh")  # still usable by its request
    b.release()
    assert region.closed
    reg.close()


def test_shrunk_or_removed_objects_fail_the_request_not_the_process(objects):
    reg = SharedMemoryRegistry(enabled=True)
    key = objects(b"z" * 4096)
    reg.register("r", key, 0, 4096)
    os.truncate("/dev/shm" + key, 100)
    with pytest.raises(InvalidArgument, match="shrank"):
        reg.attach(_request(inputs=[("x", "r", 0, 200)]))
    io = reg.attach(_request(inputs=[("x", "r", 0, 50)], outputs=[("y", "r", 1000, 8)]))
    with pytest.raises(InvalidArgument, match="shrank"):
        io.outputs["y"].write(b"12345678")
    io.release()
    assert os.path.getsize("/dev/shm" + key) == 100, "a refused write must not grow the object back"
    os.unlink("/dev/shm" + key)
    with pytest.raises(NotFound, match="removed by its owner"):
        reg.attach(_request(inputs=[("x", "r", 0, 50)]))
    reg.close()


def test_window_bounds_overlaps_and_parameters(objects):
    reg = SharedMemoryRegistry(enabled=True)
    key = objects(b"\0" * 1024)
    reg.register("a", key, 0, 512)
    reg.register("b", key, 256, 512)  # the same object: b's window starts inside a's
    cases = [
        (_request(inputs=[("x", "a", 512, 1)]), "Invalid offset for"),
        (_request(inputs=[("x", "a", 500, 13)]), "Invalid offset \\+ byte size"),
        (_request(inputs=[("x", "a", 0, 8)], outputs=[("y", "b", 0, 8), ("z", "a", 260, 4)]),
         "output 'z' overlaps output 'y'"),
        (_request(inputs=[("x", "a", 300, 8)], outputs=[("y", "b", 40, 8)]), "output 'y' overlaps input 'x'"),
    ]
    for req, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            reg.attach(req)
    no_size = pb.ModelInferRequest(model_name="m")
    no_size.inputs.add(name="x").parameters["shared_memory_region"].string_param = "a"
    with pytest.raises(InvalidArgument, match="'shared_memory_byte_size' must be specified"):
        reg.attach(no_size)
    stray = pb.ModelInferRequest(model_name="m")
    stray.inputs.add(name="x").parameters["shared_memory_offset"].int64_param = 4
    with pytest.raises(InvalidArgument, match="can not be specified without 'shared_memory_region'"):
        reg.attach(stray)
    # Adjacent windows do not overlap; every failed attach let go of what it held.
    io = reg.attach(_request(inputs=[("x", "a", 0, 256)], outputs=[("y", "b", 0, 8)]))
    io.release()
    assert all(r.users == 0 for r in reg.status())
    reg.close()


@pytest.mark.parametrize("key", ["", "/", "//x", "/a/b", "/..", "/.", "../x", "/x\n", "/" + "x" * 251, "/ü"])
def test_keys_must_be_posix_shm_names(key):
    with pytest.raises(InvalidArgument, match="not a POSIX shared memory name"):
        SharedMemoryRegistry(enabled=True).register("r", key, 0, 1)


def test_registration_limits_and_duplicates(objects):
    reg = SharedMemoryRegistry(enabled=True, limits=Limits(max_regions=2, max_bytes=100))
    key = objects(b"\0" * 100)
    reg.register("a", key, 0, 60)
    with pytest.raises(AlreadyExists, match="already in manager"):
        reg.register("a", key, 0, 10)
    with pytest.raises(ResourceExhausted, match="--shared-memory-max-mb"):
        reg.register("b", key, 0, 41)
    reg.register("b", key, 60, 40)
    with pytest.raises(ResourceExhausted, match="--shared-memory-max-regions"):
        reg.register("c", key, 0, 1)
    with pytest.raises(NotFound, match="no shared memory object"):
        SharedMemoryRegistry(enabled=True).register("x", "/tegrad_unit_absent_" + uuid.uuid4().hex, 0, 1)
    with pytest.raises(InvalidArgument, match="beyond the end"):
        SharedMemoryRegistry(enabled=True).register("x", key, 90, 11)
    reg.unregister("")
    assert reg.status() == []
