"""The one place where a servicer hands work to its device and turns failures into gRPC statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from opentelemetry import trace

from minedraft import metrics
from minedraft.engine.device_worker import DeviceWorker
from minedraft.errors import ServiceError
from minedraft.protos import common_pb2
from minedraft.serving.security import metadata_value

log = logging.getLogger(__name__)
T = TypeVar("T")
OWNER_KEY = "minedraft-owner"  # call metadata: the router instance a sequence belongs to


def owner_of(context: grpc.aio.ServicerContext) -> str:
    """The calling router's instance id ("" for a caller that sends none)."""
    return metadata_value(context.invocation_metadata(), OWNER_KEY)[:128]


def seq_errors(seq_ids: list[str], results: list) -> dict[str, common_pb2.SeqError]:
    """The per-sequence failures among an engine call's results, as protobuf, by sequence id."""
    return {seq_id: common_pb2.SeqError(seq_id=seq_id, code=result.code.value[0], message=str(result))
            for seq_id, result in zip(seq_ids, results, strict=True) if isinstance(result, ServiceError)}


async def run_engine(worker: DeviceWorker, context: grpc.aio.ServicerContext, batch_size: int,
                     fn: Callable[..., T], *args, threads: int = 0) -> tuple[T, common_pb2.StepStats]:
    """Runs fn(*args) on the device thread; a ServiceError becomes its status, anything else INTERNAL."""
    try:
        started_at = time.time()
        result, queue_ms, run_ms, ran_with = await worker.run(fn, *args, threads=threads)
    except ServiceError as error:
        await context.abort(error.code, str(error))
    except Exception as error:  # a bug or a device fault: report it, keep serving the other requests
        log.exception("%s failed", getattr(fn, "__name__", fn))
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
    method = getattr(fn, "__name__", "call")
    metrics.DEVICE_CALL_SECONDS.labels(method).observe(run_ms / 1e3)
    metrics.DEVICE_QUEUE_SECONDS.labels(method).observe(queue_ms / 1e3)
    metrics.DEVICE_BATCH.labels(method).observe(batch_size)
    metrics.DEVICE_BUSY.inc(run_ms / 1e3)
    span = trace.get_current_span()
    span.set_attribute("minedraft.batch_size", batch_size)
    span.set_attribute("minedraft.forward_ms", run_ms)
    span.set_attribute("minedraft.queue_ms", queue_ms)
    return result, common_pb2.StepStats(forward_ms=run_ms, queue_ms=queue_ms, batch_size=batch_size,
                                        started_at=started_at + queue_ms / 1e3, threads=ran_with)


class EngineServicer:
    """Base of the draft and target servicers: the engine arrives once the model has loaded."""

    def __init__(self, worker: DeviceWorker) -> None:
        self.worker = worker
        self.engine = None
        self.engine_key = ""  # `model_service.engine_key`: set with the engine
        self._releases: set[asyncio.Task] = set()  # running past their callers' deadlines

    async def ready_engine(self, context: grpc.aio.ServicerContext):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model still loading")
        return self.engine

    async def call(self, context: grpc.aio.ServicerContext, batch_size: int, fn: Callable[..., T],
                   *args, threads: int = 0) -> tuple[T, common_pb2.StepStats]:
        try:
            return await run_engine(self.worker, context, batch_size, fn, *args, threads=threads)
        finally:
            metrics.SEQUENCES_HELD.set(len(self.engine.table))

    async def Release(self, request: common_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> common_pb2.ReleaseResponse:
        # Queued behind a long forward, a release can outlast its caller's deadline; cancelling it with the
        # call would leak the sequences' state (KV memory, static slots) for good, so it runs to the end.
        engine = await self.ready_engine(context)
        release = asyncio.ensure_future(self.call(context, 0, engine.release, list(request.seq_ids),
                                                  owner_of(context)))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        released, _ = await asyncio.shield(release)
        return common_pb2.ReleaseResponse(released=released, still_held=len(engine.table))

    async def Renew(self, request: common_pb2.RenewRequest,
                    context: grpc.aio.ServicerContext) -> common_pb2.RenewResponse:
        """The owner's heartbeat: runs on the event loop, so a long forward never lets leases lapse."""
        engine = await self.ready_engine(context)
        table = engine.table
        return common_pb2.RenewResponse(renewed=table.renew(request.seq_ids, owner_of(context)), lease_s=table.lease_s,
                                        max_context=table.max_context, max_sequences=min(table.max_sequences,
                                                                                          1 << 31),
                                        engine=self.engine_key)

    async def reap_expired(self) -> None:
        """Drops sequences whose owner stopped using and renewing them (a router that crashed or hung)."""
        while True:
            await asyncio.sleep(max(0.1, self.engine.table.lease_s / 4))
            if self.engine.table.expired():  # dropped on the device thread, which owns the cache
                # Through the engine's release: a tensor-parallel engine sends it to every rank.
                released, *_ = await self.worker.run(lambda: self.engine.release(self.engine.table.expired()))
                log.warning("dropped %d sequences whose lease expired", released)
                metrics.SEQUENCES_HELD.set(len(self.engine.table))
