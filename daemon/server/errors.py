"""The one place where exceptions become gRPC statuses (and metric outcomes)."""

from __future__ import annotations

import inspect
import logging

import grpc

from daemon import errors

log = logging.getLogger("tegrad.server")

_CODES: dict[type, grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NoSpace: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

# Request outcomes for tegrad_requests_total (see telemetry.metrics.OUTCOMES).
_OUTCOMES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "invalid",
    grpc.StatusCode.FAILED_PRECONDITION: "unavailable",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code, str(exc)
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in tegrad: {type(exc).__name__}: {exc}"


def outcome_of(code: grpc.StatusCode) -> str:
    return _OUTCOMES.get(code, "error")


# Generator and coroutine frames: one of these from another task (a scheduler worker that
# caught an engine error and handed it to the request's future) may still be suspended, and
# clearing a suspended frame finalizes its coroutine before Python 3.13.
_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def release_frames(exc: BaseException) -> None:
    """Drop the locals of the finished frames ``exc`` passed through.

    A refused request's exception reaches grpc, which keeps it in a reference cycle
    (exception, traceback, frames) until the garbage collector's next full pass; the
    frames' locals are the request's bytes and tensors, so a burst of large bad
    requests would hold gigabytes until then. Frames still running are left alone,
    and so are coroutine frames outside the server's request path (see above).
    """
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if not frame.f_code.co_flags & _SUSPENDABLE or frame.f_globals.get("__name__", "").startswith("daemon.server."):
            try:
                frame.clear()
            except RuntimeError:  # still executing: the handler that is turning exc into a status
                pass
        tb = tb.tb_next


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_of(exc)
    release_frames(exc)
    await context.abort(code, message)
