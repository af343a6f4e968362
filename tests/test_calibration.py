"""auto's calibration: every short stage time it plans with is the faster of two real calls (one call alone can be
far off on a busy host); a long one is measured once. Real draft and target services on loopback, the tiny pair."""

import asyncio

from minedraft.protos import draft_pb2_grpc, target_pb2_grpc
from services.router import calibration
from services.router.backends import Backend
from services.router.calibration import calibrate
from services.router.scheduler import Scheduler
from tests.conftest import internal_channel


class RecordingStub:
    """Passes calls to a real stub and keeps each Propose/Verify's reported forward time, in order."""

    def __init__(self, stub, times: dict[str, list[float]]) -> None:
        self.stub, self.times = stub, times

    def __getattr__(self, name: str):
        call = getattr(self.stub, name)
        if name not in ("Propose", "Verify"):
            return call

        async def recorded(request, **kwargs):
            response = await call(request, **kwargs)
            self.times.setdefault(name, []).append(response.stats.forward_ms)
            return response
        return recorded


async def calibrate_on(cluster) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    times: dict[str, list[float]] = {}
    observed: dict[str, list[float]] = {"Propose": [], "Verify": []}
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        target = Backend("target", target_channel, target_pb2_grpc.TargetStub)
        draft = Backend("draft", draft_channel, draft_pb2_grpc.DraftStub)
        scheduler = Scheduler(target, draft, mode="auto", k=2, k_max=3, max_batch=2)
        target.stub, draft.stub = RecordingStub(target.stub, times), RecordingStub(draft.stub, times)
        propose, verify = scheduler.stages.observe_propose, scheduler.stages.observe_verify
        scheduler.stages.observe_propose = lambda b, s, ms, shared=False: (
            observed["Propose"].append(ms), propose(b, s, ms, shared))
        scheduler.stages.observe_verify = lambda b, k, ms, shared=False: (
            observed["Verify"].append(ms), verify(b, k, ms, shared))
        await calibrate(scheduler)
    return times, observed


def test_each_short_stage_time_is_the_faster_of_two_calls(tiny_clusters) -> None:
    times, observed = asyncio.run(calibrate_on(tiny_clusters["sd"]))
    for name in ("Propose", "Verify"):
        calls = times[name]
        assert all(ms < calibration.SECOND_SAMPLE_BELOW_MS for ms in calls)
        assert len(observed[name]) > 1 and len(calls) == 2 * len(observed[name])
        assert observed[name] == [min(calls[i:i + 2]) for i in range(0, len(calls), 2)]


def test_a_long_stage_time_is_measured_once(tiny_clusters, monkeypatch) -> None:
    monkeypatch.setattr(calibration, "SECOND_SAMPLE_BELOW_MS", 0.0)  # every call counts as long
    times, observed = asyncio.run(calibrate_on(tiny_clusters["sd"]))
    assert observed["Propose"] == times["Propose"] and observed["Verify"] == times["Verify"]
    assert len(observed["Verify"]) > 1
