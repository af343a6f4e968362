"""Errors a service raises on purpose, each with the gRPC status a client should see."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def error_for(code: int | grpc.StatusCode, message: str) -> ServiceError:
    """The ServiceError a client should see for a status a service reported (by number or enum)."""
    status = code if isinstance(code, grpc.StatusCode) else next(
        (s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
    error = ServiceError(message)
    error.code = status
    return error
