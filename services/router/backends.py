"""A downstream service as the router sees it: its stub, whether it is up, and a watcher for recovery.

When a call fails the backend is marked down and polled through the gRPC health service; once it
says SERVING again it is marked up with a new epoch. A restarted service has lost every sequence,
so state created in an older epoch must be created again before use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minedraft import metrics

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING


class Backend:
    def __init__(self, name: str, channel: grpc.aio.Channel, stub_class: type,
                 on_change: Callable[[bool], None] | None = None, poll_s: float = 0.5) -> None:
        self.name = name
        self.stub = stub_class(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._on_change = on_change
        self._poll_s = poll_s
        self.up = True
        self.epoch = 0
        self.max_context = 0  # tokens one sequence may hold there, from its last Renew answer (0: not known yet)
        metrics.BACKEND_UP.labels(name).set(1)
        self._watcher: asyncio.Task | None = None

    async def is_serving(self) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == SERVING

    async def wait_serving(self, timeout_s: float = 900.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.is_serving():
            if loop.time() > deadline:
                raise TimeoutError(f"{self.name} not serving after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)

    def mark_down(self, reason: str) -> None:
        if not self.up:
            return
        self.up = False
        metrics.BACKEND_UP.labels(self.name).set(0)
        metrics.BACKEND_DOWN.labels(self.name).inc()
        log.warning("%s is down (%s); watching for it to come back", self.name, reason)
        if self._on_change:
            self._on_change(False)
        self._watcher = asyncio.create_task(self._watch(), name=f"watch-{self.name}")

    async def _watch(self) -> None:
        while not await self.is_serving():
            await asyncio.sleep(self._poll_s)
        self.epoch += 1
        self.up = True
        metrics.BACKEND_UP.labels(self.name).set(1)
        log.warning("%s is back (epoch %d)", self.name, self.epoch)
        if self._on_change:
            self._on_change(True)
