"""What a failed call means for its requests: which status the client sees, and whether a service is down.

A service is marked down only when it cannot answer in time (UNAVAILABLE, DEADLINE_EXCEEDED). Any other error
concerns the requests in that call, and a per-sequence error (SeqError) concerns that sequence alone: on the
target it fails that request with the service's own status (RESOURCE_EXHAUSTED for a full cache, say); on the
draft it only turns speculation off for it. The service keeps serving everyone else.
"""

from __future__ import annotations

import logging

import grpc

from minedraft.errors import Unavailable, error_for, grpc_status
from minedraft.protos import common_pb2
from services.router.backends import Backend
from services.router.request import Request

log = logging.getLogger(__name__)
DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# A service refusing the router's credentials, or a cancelled internal call, is no fault of the client's.
SERVER_SIDE = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                         grpc.StatusCode.CANCELLED})


def client_error(code: int | grpc.StatusCode, message: str) -> Exception:
    status = grpc_status(code)
    return error_for(grpc.StatusCode.INTERNAL if status in SERVER_SIDE else status, message)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code(), error.details() or ""
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def target_call_failed(target: Backend, requests: list[Request], error: BaseException, what: str) -> None:
    """A whole Prefill or Verify failed: the target is down only if it did not answer, and then its requests move
    to another cell if there is one; otherwise they fail."""
    code, details = status_of(error)
    message = f"target {what} failed ({code.name}: {details})"
    if code in DOWN_CODES:
        target.mark_down(f"{what}: {code.name} {details}")  # first: a rescue must not pick this cell again
    for request in requests:
        if request.done:
            continue
        if code in DOWN_CODES and request.rescue is not None and request.rescue(request):
            continue  # it goes on in another cell
        request.fail(Unavailable(message) if code in DOWN_CODES else client_error(code, message))


def target_refused(request: Request, error: common_pb2.SeqError) -> None:
    """The target failed this one sequence (the rest of its call went through)."""
    if request.done:
        return
    if error.code == grpc.StatusCode.NOT_FOUND.value[0]:  # its lease lapsed: the router lost track of it
        request.fail(Unavailable(f"the target no longer holds this sequence ({error.message})"))
    else:
        request.fail(client_error(error.code, error.message))


def draft_call_failed(draft: Backend, requests: list[Request], error: BaseException, what: str) -> None:
    """A whole draft call failed: down if it did not answer; else these requests go on without drafts."""
    code, details = status_of(error)
    if code in DOWN_CODES:
        draft.mark_down(f"{what}: {code.name} {details}")
        return
    log.warning("draft %s failed (%s: %s); %d sequence(s) go on target-only", what, code.name, details,
                len(requests))
    for request in requests:
        request.speculate = False


def draft_refused(request: Request, error: common_pb2.SeqError) -> None:
    """The draft failed this one sequence: re-sync it if the draft lost it, else decode it target-only."""
    if error.code == grpc.StatusCode.NOT_FOUND.value[0]:
        request.draft_epoch = -1  # sent again (replacing) at the lane's next propose
        return
    log.warning("draft refused %s (%s); it goes on target-only", request.seq_id, error.message)
    request.speculate = False
