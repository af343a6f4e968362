"""RouterMonitor: the router's counters and device timeline, for the benchmark and for people."""

from __future__ import annotations

import grpc

from minedraft.protos import monitor_pb2, monitor_pb2_grpc
from minedraft.serving.security import presented_token, token_matches
from services.router.cells import Cells


class MonitorServicer(monitor_pb2_grpc.RouterMonitorServicer):
    def __init__(self, cells: Cells, admin_key: str | None = None, open_clear: bool = True) -> None:
        """`clear` wipes what others measure: it takes the admin key, or no key at all on a router that has
        none configured (`open_clear`, the loopback default)."""
        self.cells = cells
        self.admin_key = admin_key
        self.open_clear = open_clear

    async def GetStats(self, request: monitor_pb2.StatsRequest,
                       context: grpc.aio.ServicerContext) -> monitor_pb2.RouterStats:
        if request.clear and not self.open_clear and not (
                self.admin_key and token_matches(presented_token(context), [self.admin_key])):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "clearing the counters takes the admin key")
        if request.cell >= len(self.cells):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cell {request.cell}: this router has "
                                f"{len(self.cells)}")
        return self.cells[request.cell].snapshot(clear=request.clear)
