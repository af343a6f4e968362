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
from minedraft.device_worker import DeviceWorker
from minedraft.errors import ServiceError
from minedraft.protos import common_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        self._releases: set[asyncio.Task] = set()  # running past their callers' deadlines

    async def call(self, context: grpc.aio.ServicerContext, batch_size: int, method: str,
                   *args, threads: int = 0) -> tuple[object, common_pb2.StepStats]:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model still loading")
        try:
            return await run_engine(self.worker, context, batch_size, getattr(self.engine, method), *args,
                                    threads=threads)
        finally:
            metrics.SEQUENCES_HELD.set(len(self.engine.table))

    async def Release(self, request: common_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> common_pb2.ReleaseResponse:
        # Queued behind a long forward, a release can outlast its caller's deadline; cancelling it with the
        # call would leak the sequences' state (KV memory, static slots) for good, so it runs to the end.
        release = asyncio.ensure_future(self.call(context, 0, "release", list(request.seq_ids)))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        released, _ = await asyncio.shield(release)
        return common_pb2.ReleaseResponse(released=released, still_held=len(self.engine.table))
