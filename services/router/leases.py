"""The router's side of the services' leases: who it is, and a heartbeat naming the sequences it still wants.

Every call carries the router's instance id (`minedraft-owner` metadata); each service drops a sequence its
owner has neither used nor renewed for the service's lease time. So a router that crashes, hangs, or loses
track of a sequence (a draft prefill that outlived its deadline) leaks nothing for longer than that.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

import grpc

from minedraft.protos import common_pb2
from minedraft.serving.servicing import OWNER_KEY

if TYPE_CHECKING:
    from services.router.scheduler import Scheduler

log = logging.getLogger(__name__)


def new_owner_id() -> str:
    return f"router-{uuid.uuid4().hex}"


class CallMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (the owner id; a bearer token) to every unary call on a channel."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *self.pairs)
        details = grpc.aio.ClientCallDetails(client_call_details.method, client_call_details.timeout, metadata,
                                             client_call_details.credentials, client_call_details.wait_for_ready)
        return await continuation(details, request)


def owner_metadata(owner: str) -> tuple[str, str]:
    return OWNER_KEY, owner


async def keep_leases(scheduler: Scheduler, interval_s: float = 5.0) -> None:
    """Renews, every third of the services' lease, the sequences of every live request."""
    while True:
        live = scheduler.live()
        backends = [(scheduler.target, [r.seq_id for r in live])]
        if scheduler.draft is not None:
            backends.append((scheduler.draft, [r.seq_id for r in live if r.draft_sent]))
        for backend, ids in backends:
            if not backend.up:
                continue
            try:
                reply = await backend.stub.Renew(common_pb2.RenewRequest(seq_ids=ids), timeout=max(1.0, interval_s))
                interval_s = max(0.2, reply.lease_s / 3)
                backend.max_context = reply.max_context
            except grpc.aio.AioRpcError as error:
                log.info("lease renewal on %s failed: %s", backend.name, error.code().name)
        await asyncio.sleep(interval_s)
