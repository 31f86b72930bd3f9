"""Errors that tegrad raises on purpose.

Each class names the gRPC status a client should see; ``daemon.server.errors``
is the one place that turns them (and anything unexpected) into statuses.
Messages are sentences a person can act on.
"""

from __future__ import annotations


class TegradError(Exception):
    """Base class; the subclass decides the gRPC status."""


class InvalidArgument(TegradError):
    """The request or a file is malformed (INVALID_ARGUMENT)."""


class NotFound(TegradError):
    """Unknown model or version (NOT_FOUND)."""


class FailedPrecondition(TegradError):
    """The model exists but is not ready (FAILED_PRECONDITION)."""


class AlreadyExists(TegradError):
    """Something with that name is already there, e.g. a model version a bundle would install (ALREADY_EXISTS)."""


class ResourceExhausted(TegradError):
    """Queue full or message too large (RESOURCE_EXHAUSTED)."""


class Unavailable(TegradError):
    """The server is draining or the model is being unloaded (UNAVAILABLE)."""


class DeadlineExceeded(TegradError):
    """The request's deadline passed before it could run (DEADLINE_EXCEEDED)."""


class Unimplemented(TegradError):
    """A protocol feature tegrad does not offer (UNIMPLEMENTED)."""


class Internal(TegradError):
    """A backend failed while running a valid request (INTERNAL)."""


class ConfigError(InvalidArgument):
    """A model configuration file is invalid; the message names file and key."""


class NoSpace(ResourceExhausted):
    """A disk the daemon writes to is full (RESOURCE_EXHAUSTED); the message names which one."""
