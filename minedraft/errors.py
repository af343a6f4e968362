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


def grpc_status(code: int | grpc.StatusCode) -> grpc.StatusCode:
    """A gRPC status from its number (as SeqError carries it) or itself."""
    if isinstance(code, grpc.StatusCode):
        return code
    return next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)


def error_for(code: int | grpc.StatusCode, message: str) -> ServiceError:
    """The ServiceError a client should see for a status a service reported (by number or enum)."""
    error = ServiceError(message)
    error.code = grpc_status(code)
    return error
