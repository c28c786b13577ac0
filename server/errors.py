"""Domain errors of the serving path, each with the gRPC status it means (architecture.md §6).

Handlers raise these; the error interceptor turns them into the status and message. Any
other exception is a bug: INTERNAL with a request id, logged with its traceback.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class NotReady(ServingError):
    """Model loading or failed, or the server draining: retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


class Retired(NotReady):
    """The version stopped taking requests (unloaded or swapped out): route again."""


class VersionNotLoaded(ServingError):
    """A version that exists but is not being served: retrying will not help."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NoFeatureStore(ServingError):
    """A feature-store call on a server started without one."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED
