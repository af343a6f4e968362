"""What the rounds leave behind for people: lane counters, Prometheus metrics, span events and the device
timeline the benchmark reads (RouterMonitor). None of it steers scheduling; the policy keeps its own model."""

from __future__ import annotations

from collections import deque

from minedraft import metrics
from minedraft.protos import common_pb2, monitor_pb2
from services.router.lanes import Lane
from services.router.request import Request


class Recorder:
    def __init__(self) -> None:
        self.events: deque[monitor_pb2.DeviceEvent] = deque(maxlen=100_000)

    def device_call(self, device: str, kind: str, lane: Lane, stats: common_pb2.StepStats, tokens: int) -> None:
        metrics.STAGE_SECONDS.labels(f"{device}_{kind}").observe(stats.forward_ms / 1e3)
        self.events.append(monitor_pb2.DeviceEvent(
            device=device, kind=kind, lane=lane.index, start=stats.started_at,
            end=stats.started_at + stats.forward_ms / 1e3, batch_size=stats.batch_size, tokens=tokens,
            threads=stats.threads))

    def propose(self, lane: Lane, stats: common_pb2.StepStats, tokens: int) -> None:
        lane.counters.draft_ms += stats.forward_ms
        lane.draft_ms += stats.forward_ms
        lane.counters.propose_calls += 1
        self.device_call("draft", "propose", lane, stats, tokens)

    def verify(self, lane: Lane, batch_size: int, stats: common_pb2.StepStats, tokens: int) -> None:
        lane.counters.verify_ms += stats.forward_ms
        lane.counters.verify_calls += 1
        lane.counters.sequences_in_rounds += batch_size
        self.device_call("target", "verify", lane, stats, tokens)

    @staticmethod
    def verdict(lane: Lane, request: Request, proposed: int, accepted: int) -> None:
        request.drafted += proposed
        request.accepted += accepted
        request.rounds += 1
        for position in range(1, proposed + 1):
            metrics.DRAFTED.labels(str(position)).inc()
            if position <= accepted:
                metrics.ACCEPTED.labels(str(position)).inc()
        request.span.add_event("round", {"minedraft.lane": lane.index, "minedraft.drafted": proposed,
                                         "minedraft.accepted": accepted})

    @staticmethod
    def round_done(lane: Lane, seconds: float) -> None:
        lane.counters.rounds += 1
        lane.counters.round_ms += seconds * 1e3
        metrics.ROUND_SECONDS.labels(str(lane.index)).observe(seconds)

    def snapshot(self, mode: str, k: int, lanes: list[Lane], clear: bool = False) -> monitor_pb2.RouterStats:
        stats = monitor_pb2.RouterStats(mode=mode, k=k, lanes=[lane.counters for lane in lanes],
                                        events=list(self.events))
        if clear:
            self.events.clear()
            for lane in lanes:
                lane.counters = monitor_pb2.LaneCounters(lane=lane.index)
        return stats
