"""How draft and target share the CPU: by mode, and call by call (all cores alone, half while both run)."""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from minedraft.app.client import collect, make_request, stream
from minedraft.app.cluster_config import ClusterConfig
from minedraft.app.launcher import add_args, commands, cpu_layout
from minedraft.protos import monitor_pb2, monitor_pb2_grpc
from tests.conftest import channel_to

CORES = len(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="sharing needs at least two cores")


def launcher_args(mode: str, *extra: str) -> ClusterConfig:
    parser = argparse.ArgumentParser()
    add_args(parser)
    return ClusterConfig.from_args(parser.parse_args(["--mode", mode, *extra]))


@needs_two_cores
def test_layout_by_mode() -> None:
    layouts = {mode: cpu_layout(launcher_args(mode)) for mode in ("ar", "sd", "psd", "auto")}
    assert layouts == {"ar": "shared", "sd": "shared", "psd": "split", "auto": "shared"}
    psd = commands(launcher_args("psd"), 1, 2)
    draft_cores = next(a for a in psd["draft"] if a.startswith("--cpu-cores="))
    target_cores = next(a for a in psd["target"] if a.startswith("--cpu-cores="))
    assert not set(draft_cores.split("=")[1].split(",")) & set(target_cores.split("=")[1].split(","))
    assert not any(a.startswith("--share-cores") for a in psd["router"])
    auto = commands(launcher_args("auto"), 1, 2)
    assert f"--share-cores={CORES}" in auto["router"]
    assert f"--threads={CORES}" in auto["draft"] and f"--threads={CORES}" in auto["target"]
    assert "draft" not in commands(launcher_args("ar"), 1, 2), "ar runs the target alone, on every core"
    assert cpu_layout(launcher_args("auto", "--device", "cuda")) == "none"


def device_events(cluster) -> list[monitor_pb2.DeviceEvent]:
    with channel_to(cluster) as channel:
        return list(monitor_pb2_grpc.RouterMonitorStub(channel).GetStats(monitor_pb2.StatsRequest()).events)


def run_requests(cluster, count: int, stagger_s: float) -> None:
    def one(i: int) -> None:
        time.sleep(i * stagger_s)
        with channel_to(cluster) as channel:
            collect(stream(channel, make_request(prompt=f"def f{i}(x):", max_tokens=24), timeout=60))

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))


@needs_two_cores
def test_one_lane_calls_get_every_core_and_the_target_prefills_first(clusters, tiny_pair) -> None:
    """sd on shared cores: draft and verify alternate, each with every core; a new request's prompt runs on the
    target alone (every core), and the draft caches it afterwards, never beside it."""
    cluster = clusters.get("sd", tiny_pair, cpu_layout="shared")
    run_requests(cluster, 3, stagger_s=0.0)
    events = device_events(cluster)
    assert events and all(e.threads == CORES for e in events)
    target = [e for e in events if e.device == "target"]
    draft_prefills = [e for e in events if e.device == "draft" and e.kind == "prefill"]
    assert draft_prefills and not any(d.start < t.end and t.start < d.end for d in draft_prefills for t in target)


@needs_two_cores
def test_overlapped_lanes_split_the_cores(clusters, tiny_pair) -> None:
    cluster = clusters.get("psd", tiny_pair, cpu_layout="shared", max_batch=2)
    run_requests(cluster, 4, stagger_s=0.0)
    rounds = [e for e in device_events(cluster) if e.kind in ("propose", "verify")]
    assert any(e.threads == CORES // 2 for e in rounds), "with both lanes busy, each stage gets half"
    assert all(e.threads in (CORES, CORES // 2) for e in rounds)
