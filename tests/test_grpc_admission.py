"""The pieces the gRPC entry uses before a request is parsed: the wire scan of a
ModelInferRequest's names, model-name rules, the byte budget, rate-limited
logging and the restricted-protocol flag."""

from __future__ import annotations

import asyncio
import logging

import pytest

from daemon.errors import InvalidArgument, ResourceExhausted
from daemon.protogen import grpc_service_pb2 as pb
from daemon.repository import names
from daemon.server import restricted, wire
from daemon.server.admission import RequestBytesBudget
from daemon.server.ratelimit import RateLimitedLog, source_of


def _request(**fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(**fields)
    request.parameters["timeout"].int64_param = 5
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.outputs.add(name="out")
    request.raw_input_contents.append(bytes(16))
    return request


@pytest.mark.parametrize("fields", [
    {"model_name": "digits", "model_version": "2", "id": "r1"},
    {"model_name": "ü" * 10},
    {},
])
def test_peek_reads_what_protobuf_parses(fields):
    data = _request(**fields).SerializeToString()
    head = wire.peek(data)
    parsed = pb.ModelInferRequest.FromString(data)
    assert bytes(head.model_name).decode() == parsed.model_name
    assert bytes(head.model_version).decode() == parsed.model_version
    assert bytes(head.id).decode() == parsed.id


def test_peek_takes_the_last_occurrence_like_protobuf():
    data = _request(model_name="first").SerializeToString() + pb.ModelInferRequest(model_name="last").SerializeToString()
    assert pb.ModelInferRequest.FromString(data).model_name == "last"
    assert bytes(wire.peek(data).model_name) == b"last"


@pytest.mark.parametrize("data", [
    b"\x0a\x10digits",          # length beyond the end
    b"\x0a",                    # tag without length
    b"\x0b\x0c",                # group wire type
    b"\x00\x01",                # field number 0
    b"\x08" + b"\xff" * 11,     # varint longer than 64 bits
])
def test_peek_refuses_malformed_top_levels(data):
    assert wire.peek(data) is None


def test_peek_gives_up_on_requests_with_too_many_fields():
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(wire.MAX_SCANNED_FIELDS + 1):
        request.outputs.add()
    assert wire.peek(request.SerializeToString()) is None


def test_parse_names_the_message_type():
    with pytest.raises(InvalidArgument, match=r"^cannot parse ModelInferRequest: "):
        wire.parse(pb.ModelInferRequest, b"\x0a\x10digits")


@pytest.mark.parametrize("name, rule", [
    ("d" * 256, "256 bytes long"),
    ("é" * 128, "256 bytes long"),
    (b"dig\xffits", "not valid UTF-8"),
    ("..", "relative directory"),
    (".", "relative directory"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("a\x00b", "NUL"),
    ("a\x1bb", r"U\+001B"),
    ("a\x7fb", r"U\+007F"),
])
def test_model_names_that_break_a_rule(name, rule):
    with pytest.raises(InvalidArgument, match=rule):
        names.check(name)


@pytest.mark.parametrize("name", ["digits", "d" * 255, "efficientnet-lite0_v2.1", "modèle", ""])
def test_model_names_that_pass(name):
    assert names.check(name) == name
    assert names.check(name.encode()) == name


def test_a_long_bad_name_is_not_echoed_in_full():
    with pytest.raises(InvalidArgument) as err:
        names.check("/" * 200)
    assert len(str(err.value)) < 200


def test_budget_makes_the_next_request_wait_then_refuses_it_at_its_deadline():
    async def scenario():
        budget = RequestBytesBudget(100, trim=False)
        order = []
        async with budget.hold(80, None):
            with pytest.raises(ResourceExhausted, match="limit is 0 MiB"):
                async with budget.hold(30, 0.05):
                    pass
            waiter = asyncio.ensure_future(_hold(budget, 30, order))
            await asyncio.sleep(0)
            order.append("release")
        await waiter
        async with budget.hold(10_000, 1.0):  # larger than the budget: runs alone
            assert budget.used == 100
        assert budget.used == 0
        return order

    async def _hold(budget, size, order):
        async with budget.hold(size, 5.0):
            order.append("held")

    assert asyncio.run(scenario()) == ["release", "held"]


def test_rate_limited_log_says_how_many_it_left_out(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("tegrad.test"), interval_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "tegrad.test"):
        assert limited.warning("ipv4:10.0.0.1", "bad %s", "one")
        assert not limited.warning("ipv4:10.0.0.1", "bad %s", "two")
        assert not limited.warning("ipv4:10.0.0.1", "bad %s", "three")
        assert limited.warning("ipv4:10.0.0.2", "bad %s", "other host")
        now[0] = 61
        assert limited.warning("ipv4:10.0.0.1", "bad %s", "four")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad one", "bad other host",
                        "bad four (2 more from ipv4:10.0.0.1 in the last 60 s not logged)"]
    assert source_of("ipv4:10.0.0.1:5555") == source_of("ipv4:10.0.0.1:6666") == "ipv4:10.0.0.1"
    assert source_of("ipv6:[::1]:5555") == "ipv6:[::1]"


def test_restricted_protocol_flags_follow_triton():
    rules = restricted.rules(["model-repository,statistics:admin-key=s3cret", "health:probe=1"])
    load = rules["/inference.GRPCInferenceService/RepositoryModelLoad"]
    assert (load.header, load.value) == ("triton-grpc-protocol-admin-key", "s3cret")
    assert rules["/grpc.health.v1.Health/Check"].header == "triton-grpc-protocol-probe"
    assert "/inference.GRPCInferenceService/ModelInfer" not in rules
    for bad, message in [("model-repository", "expected"), ("model-repository:key", "expected"),
                         ("repository:k=v", "unknown protocol"), (":k=v", "expected")]:
        with pytest.raises(ValueError, match=message):
            restricted.rules([bad])
    with pytest.raises(ValueError, match="restricted twice"):
        restricted.rules(["statistics:a=1", "statistics,health:b=2"])


def test_budget_forgets_a_cancelled_waiter_and_serves_the_next():
    async def scenario():
        budget = RequestBytesBudget(100, trim=False)
        async with budget.hold(100, None):
            cancelled = asyncio.ensure_future(_take(budget, 60))
            queued = asyncio.ensure_future(_take(budget, 50))
            await asyncio.sleep(0)
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
        await queued
        return budget.used, len(budget._waiters)

    async def _take(budget, size):
        async with budget.hold(size, 5.0):
            pass

    assert asyncio.run(scenario()) == (0, 0)


def test_releasing_a_handed_over_exception_leaves_the_task_that_raised_it_alive():
    # A scheduler worker catches an engine error and sets it on a request's future; the
    # error's traceback then holds the worker's suspended frame, which must not be cleared.
    from daemon.server.errors import release_frames

    async def scenario():
        handed_over = asyncio.get_running_loop().create_future()
        resume = asyncio.Event()

        async def worker():
            big = bytearray(1 << 20)
            try:
                raise InvalidArgument("bad input")
            except InvalidArgument as exc:
                handed_over.set_exception(exc)
            await resume.wait()
            return len(big)

        task = asyncio.ensure_future(worker())
        with pytest.raises(InvalidArgument) as err:
            await handed_over
        release_frames(err.value)
        resume.set()
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(scenario()) == 1 << 20
