"""RouterMonitor: the router's counters and device timeline, for the benchmark and for people."""

from __future__ import annotations

import grpc

from minedraft.protos import monitor_pb2, monitor_pb2_grpc
from services.router.scheduler import Scheduler


class MonitorServicer(monitor_pb2_grpc.RouterMonitorServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def GetStats(self, request: monitor_pb2.StatsRequest,
                       context: grpc.aio.ServicerContext) -> monitor_pb2.RouterStats:
        return self.scheduler.snapshot(clear=request.clear)
