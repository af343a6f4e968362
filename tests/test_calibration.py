"""auto's calibration: every short stage time it plans with is the faster of two real calls, the second in a pass
after every batch's first (one call alone, or two back to back, can be far off on a host busy just after start-up);
a long batch is measured once. Real draft and target services on loopback, the tiny pair."""

import asyncio
import json
import os
import time
from collections.abc import Callable

import pytest

from minedraft.protos import common_pb2, draft_pb2_grpc, target_pb2_grpc
from services.router import calibration
from services.router.backends import Backend
from services.router.calibration import CalibrationCache, calibrate
from services.router.scheduler import Scheduler
from tests.conftest import internal_channel


class RecordingStub:
    """Passes calls to a real stub and keeps each Prefill/Propose/Verify's reported forward time, in order; the
    first `slowed` calls report `slow_by` times what they took (a host busy at start-up)."""

    def __init__(self, stub, times: dict[str, list[float]], slowed: int = 0, slow_by: float = 1.0,
                 delay_ms: Callable[[str, object], float] = lambda name, request: 0.0) -> None:
        self.stub, self.times, self.slowed, self.slow_by, self.delay_ms = stub, times, slowed, slow_by, delay_ms

    def __getattr__(self, name: str):
        call = getattr(self.stub, name)
        if name not in ("Propose", "Verify", "Prefill"):
            return call

        async def recorded(request, **kwargs):
            response = await call(request, **kwargs)
            if response.HasField("stats") and self.slowed > 0:
                self.slowed -= 1
                response.stats.forward_ms *= self.slow_by
            if response.HasField("stats"):
                response.stats.forward_ms += self.delay_ms(name, request)
            self.times.setdefault(name, []).append(response.stats.forward_ms if response.HasField("stats") else 0.0)
            return response
        return recorded


async def calibrate_on(cluster, cache: CalibrationCache | None = None, share_cores: int = 0,
                       slowed: tuple[int, int] = (0, 0), slow_by: float = 1.0,
                       target_delay_ms: Callable[[str, object], float] = lambda name, request: 0.0
                       ) -> tuple[dict[str, list[float]], dict[str, list[float]], Scheduler]:
    times: dict[str, list[float]] = {}
    observed: dict[str, list[float]] = {"Propose": [], "Verify": []}
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        target = Backend("target", target_channel, target_pb2_grpc.TargetStub)
        draft = Backend("draft", draft_channel, draft_pb2_grpc.DraftStub)
        scheduler = Scheduler(target, draft, mode="auto", k=2, k_max=3, max_batch=2, share_cores=share_cores)
        target.stub = RecordingStub(target.stub, times, slowed[0], slow_by, target_delay_ms)
        draft.stub = RecordingStub(draft.stub, times, slowed[1], slow_by)
        propose, verify = scheduler.stages.observe_propose, scheduler.stages.observe_verify
        scheduler.stages.observe_propose = lambda b, s, ms, shared=False, **paced: (
            observed["Propose"].append(ms), propose(b, s, ms, shared, **paced))
        scheduler.stages.observe_verify = lambda b, k, ms, shared=False, **paced: (
            observed["Verify"].append(ms), verify(b, k, ms, shared, **paced))
        await calibrate(scheduler, cache)
    return times, observed, scheduler


@pytest.fixture(autouse=True)
def rows_check_off(monkeypatch) -> None:
    """The tiny models' calls take a few ms and may jitter past the rows check; the tests of the check turn it on."""
    monkeypatch.setattr(calibration, "CONSISTENT_WITHIN", float("inf"))


def test_each_short_stage_time_is_the_faster_of_two_passes(tiny_clusters) -> None:
    times, observed, scheduler = asyncio.run(calibrate_on(tiny_clusters["sd"]))
    for name in ("Propose", "Verify"):
        calls, each = times[name], len(times[name]) // 4  # two batches, two passes: batch 1, batch 2, 1 again, 2 again
        assert len(observed[name]) > 1 and len(calls) == 2 * len(observed[name]) == 4 * each
        first, second = calls[:2 * each], calls[2 * each:]
        assert observed[name] == [min(a, b) for a, b in zip(first, second, strict=True)]
    costs = [scheduler.stages.alone.draft_step, *scheduler.stages.alone.verify.by_k.values()]
    assert costs[0].known and not any(cost.live for cost in costs), "what live calls are measured against"


def test_a_host_busy_through_the_first_pass_does_not_reach_the_plan(tiny_clusters, monkeypatch) -> None:
    """Every call of the first pass reports 100x its time (the AVX2 first start's were 1.5-1.9x): the stage times
    planned with are the second pass's, as an undisturbed calibration's would be."""
    monkeypatch.setattr(calibration, "SECOND_PASS_BELOW_MS", float("inf"))  # however slow: what is kept, not when
    # A pass of 2 batches: the target 2 x (a prefill, 3 verifies), the draft 2 x (a prefill, a propose).
    times, observed, scheduler = asyncio.run(calibrate_on(tiny_clusters["sd"], slowed=(8, 4), slow_by=100.0))
    for name in ("Propose", "Verify"):
        calls = times[name]
        first, second = calls[:len(calls) // 2], calls[len(calls) // 2:]
        assert all(a > 10 * b for a, b in zip(first, second, strict=True))  # the premise: the first pass was slowed
        assert observed[name] == second  # each is its second-pass time: none of the slowed calls was kept
    assert scheduler.stages.draft_ms_per_token * 8 < times["Prefill"][0] / 16  # nor the draft's slowed prefill


def test_a_long_batch_is_measured_once(tiny_clusters, monkeypatch) -> None:
    monkeypatch.setattr(calibration, "SECOND_PASS_BELOW_MS", 0.0)  # every batch counts as long
    times, observed, _ = asyncio.run(calibrate_on(tiny_clusters["sd"]))
    assert observed["Propose"] == times["Propose"] and observed["Verify"] == times["Verify"]
    assert len(observed["Verify"]) > 1


def estimates(scheduler: Scheduler) -> list[float]:
    return [scheduler.stages.draft_step(b) for b in (1, 2)] + [scheduler.stages.verify(b, k) for b in (1, 2)
                                                                for k in (0, 2, 3)]


def test_a_calibration_is_cached_by_engine_and_read_back_instead_of_measured(tiny_clusters, tmp_path) -> None:
    cluster = tiny_clusters["sd"]
    cache = CalibrationCache(str(tmp_path), engines=["target engine", "draft engine"])
    times, _, measured = asyncio.run(calibrate_on(cluster, cache))
    (saved,) = tmp_path.glob("*.json")
    assert times["Propose"] and times["Verify"]
    times, _, read_back = asyncio.run(calibrate_on(cluster, cache))
    assert times == {} and estimates(read_back) == estimates(measured)  # not one call to either model
    assert read_back.stages.draft_ms_per_token == measured.stages.draft_ms_per_token is not None
    times, _, _ = asyncio.run(calibrate_on(cluster, CalibrationCache(str(tmp_path), True, cache.engines)))
    assert times["Propose"] and list(tmp_path.glob("*.json")) == [saved]  # refreshed in place
    other = CalibrationCache(str(tmp_path), engines=["target engine", "another draft engine"])
    times, _, _ = asyncio.run(calibrate_on(cluster, other))
    assert times["Propose"] and len(list(tmp_path.glob("*.json"))) == 2
    saved.write_text('[["propose", 1]]')  # misshapen: measured again
    times, _, _ = asyncio.run(calibrate_on(cluster, cache))
    assert times["Propose"]
    unnamed = CalibrationCache(str(tmp_path / "unnamed"), engines=["target engine", ""])  # an engine without a key
    times, _, _ = asyncio.run(calibrate_on(cluster, unnamed))
    assert times["Propose"] and not (tmp_path / "unnamed").exists()


def test_an_old_calibration_is_measured_again_and_old_files_are_removed(tiny_clusters, tmp_path) -> None:
    """Each commit's code makes a new key, so without an age limit the folder would only grow; and a host's
    speed drifts, so a week-old calibration is not trusted."""
    cluster = tiny_clusters["sd"]
    cache = CalibrationCache(str(tmp_path), engines=["target engine", "draft engine"], max_age_days=1.0)
    asyncio.run(calibrate_on(cluster, cache))
    (saved,) = tmp_path.glob("*.json")
    two_days_ago = time.time() - 2 * 86400
    os.utime(saved, (two_days_ago, two_days_ago))
    stale, recent, foreign = tmp_path / f"{'a' * 32}.json", tmp_path / f"{'b' * 32}.json", tmp_path / "notes.json"
    for path in (stale, recent, foreign):  # an older commit's key, another engine's, a file that is not ours
        path.write_text("[]")
    for path in (stale, foreign):
        os.utime(path, (two_days_ago, two_days_ago))
    times, _, _ = asyncio.run(calibrate_on(cluster, cache))
    assert times["Propose"] and times["Verify"]  # measured, not read back
    assert sorted(tmp_path.glob("*.json")) == sorted([saved, recent, foreign])  # the old key's file is gone
    assert time.time() - saved.stat().st_mtime < 3600  # and the kept one rewritten
    times, _, _ = asyncio.run(calibrate_on(cluster, cache))
    assert times == {}  # fresh again: read back


def test_on_shared_cores_one_prefill_serves_both_core_counts(tiny_clusters) -> None:
    shared_times, shared, scheduler = asyncio.run(calibrate_on(tiny_clusters["sd"], share_cores=2))
    alone_times, alone, _ = asyncio.run(calibrate_on(tiny_clusters["sd"]))
    assert len(shared["Verify"]) == 2 * len(alone["Verify"]) and len(shared["Propose"]) == 2 * len(alone["Propose"])
    # draft and target, 2 batches, 2 passes
    assert len(shared_times["Prefill"]) == len(alone_times["Prefill"]) == 2 * 2 * 2
    assert scheduler.stages.costs(True).verify.known and scheduler.stages.costs(False).verify.known


def test_each_service_names_what_its_speed_depends_on(tiny_clusters, tiny_pair) -> None:
    async def engines() -> list[dict]:
        cluster = tiny_clusters["sd"]
        keys = []
        for address, stub in ((cluster.target_address, target_pb2_grpc.TargetStub),
                              (cluster.draft_address, draft_pb2_grpc.DraftStub)):
            async with internal_channel(cluster, address) as channel:
                keys.append(json.loads((await stub(channel).Renew(common_pb2.RenewRequest())).engine))
        return keys

    target, draft = asyncio.run(engines())
    assert (target["model"], draft["model"]) == (str(tiny_pair[0]), str(tiny_pair[1]))
    assert target["dtype"] == "torch.float64" and target["threads"] >= 1 and target["cpu"] and target["torch"]


def test_a_call_is_judged_against_calls_of_its_stage_with_more_rows_on_its_cores(monkeypatch) -> None:
    monkeypatch.setattr(calibration, "CONSISTENT_WITHIN", 1.25)
    one = [("prefill", 1, 16, 900.0, False), ("propose", 1, 4, 100.0, False), ("verify", 1, 0, 75.0, False),
           ("verify", 1, 4, 72.0, False), ("verify", 1, 0, 200.0, True)]  # the shared call: on fewer cores
    four = [("prefill", 4, 64, 130.0, False), ("propose", 4, 4, 160.0, False), ("verify", 4, 0, 84.0, False),
            ("verify", 4, 4, 168.0, False), ("verify", 4, 0, 250.0, True)]
    assert calibration._slowed([one, four]) == []  # undisturbed (a Zen 4 start's; a slow prefill is not judged)
    four[2] = ("verify", 4, 0, 148.0, False)  # 4 rows, costlier than batch 1's 5 by 1.43x: slowed
    assert calibration._slowed([one, four]) == [(1, "verify 4x0", 148.0, "verify 1x4", 72.0)]
    one[1] = ("propose", 1, 4, 250.0, False)  # a draft step of 1 sequence costlier than one of 4
    assert {i for i, *_ in calibration._slowed([one, four])} == {0, 1}
    monkeypatch.setattr(calibration, "NOISE_MS", 100.0)  # 76 and 90 ms more: within the noise
    assert calibration._slowed([one, four]) == []


def check_rows(monkeypatch) -> None:
    """The check on, with a noise floor far above the tiny models' jitter and below the 1 s a slowed call adds."""
    monkeypatch.setattr(calibration, "CONSISTENT_WITHIN", 1.25)
    monkeypatch.setattr(calibration, "NOISE_MS", 200.0)
    monkeypatch.setattr(calibration, "EXTRA_PASS_PAUSE_S", 0.0)


def target_only_at_batch_2(calls: int) -> Callable[[str, object], float]:
    """A target that reports its first `calls` verifies of 2 sequences without drafts (2 rows) 1 s slower: a host
    busy during them, through both passes."""
    left = [calls]

    def delay_ms(name: str, request) -> float:
        if name != "Verify" or len(request.seqs) != 2 or any(seq.drafts for seq in request.seqs) or not left[0]:
            return 0.0
        left[0] -= 1
        return 1000.0
    return delay_ms


def test_a_call_costlier_than_one_with_more_rows_is_measured_again(tiny_clusters, tmp_path, monkeypatch) -> None:
    """On the Zen 4 EPYC a start calibrated batch 4's target-only verify (4 rows) at 148 ms, above batch 1's verify
    of 4 drafts (5 rows) at 106, both passes busy; auto planned with it, and kept it a week. Slowed in both passes
    here, the batch is measured a third time, and the plan and the kept file have the third pass's time."""
    check_rows(monkeypatch)
    cache = CalibrationCache(str(tmp_path), engines=["target engine", "draft engine"])
    times, _, scheduler = asyncio.run(calibrate_on(tiny_clusters["sd"], cache,
                                                   target_delay_ms=target_only_at_batch_2(2)))
    assert len(times["Verify"]) >= 2 * 2 * 3 + 3  # 2 batches x 2 passes x 3 lengths, and batch 2's again
    assert scheduler.stages.verify(2, 0) < 500.0  # not a slowed call's time
    (saved,) = tmp_path.glob("*.json")
    kept = [ms for stage, batch, k, ms, _ in json.loads(saved.read_text()) if (stage, batch, k) == ("verify", 2, 0)]
    assert kept and max(kept) < 500.0


def test_a_calibration_slowed_in_every_pass_is_used_but_not_kept(tiny_clusters, tmp_path, monkeypatch) -> None:
    """Nor is one kept before it left: `--recalibrate` asked to replace it, so the next start measures afresh."""
    cache = CalibrationCache(str(tmp_path), engines=["target engine", "draft engine"])
    asyncio.run(calibrate_on(tiny_clusters["sd"], cache))
    assert len(list(tmp_path.glob("*.json"))) == 1
    check_rows(monkeypatch)
    cache.refresh = True
    times, _, scheduler = asyncio.run(calibrate_on(tiny_clusters["sd"], cache,
                                                   target_delay_ms=target_only_at_batch_2(10**6)))
    slowed = [ms for ms in times["Verify"] if ms >= 1000.0]
    assert len(slowed) == 2 + calibration.EXTRA_PASSES  # each pass of batch 2, then no more
    assert scheduler.stages.verify(2, 0) >= 1000.0  # used: the best there is
    assert not list(tmp_path.glob("*.json"))  # but not kept: the next start measures afresh
