"""One router over two draft/target cells: load spreads, and requests outlive a cell's target (kill -9)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import Cluster, free_port
from minedraft.protos import monitor_pb2, monitor_pb2_grpc, target_pb2_grpc
from services.router.backends import Backend
from services.router.cells import Cells
from services.router.scheduler import Scheduler
from tests.conftest import cluster_args
from tests.test_end_to_end import PROMPTS
from tests.test_faults import SERVING, router_status, wait_until

LONG = 160  # tokens: long enough that kill -9 lands mid-stream


def spawn(command: list[str], env: dict, port: int) -> subprocess.Popen:
    """A copy of a cluster's service on another port (with the cluster's internal token, in env)."""
    command = list(command)
    command[command.index("--port") + 1] = str(port)
    return subprocess.Popen(command, env=env)


@pytest.fixture
def two_cells(tiny_pair):
    """Cluster A (draft, target, router), a second draft and target (cell B) with A's internal token, and a
    router over both cells. The target computes prompts apart (int4-w8a8-prompt): a request moved to another
    cell must have its output computed there as output, not as prompt, to continue with the same tokens."""
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=4, target_quant="int4-w8a8-prompt")) as cluster:
        cluster.wait_ready(timeout_s=120)
        env = cluster.env_for("router")
        draft_b, target_b, router_port = free_port(), free_port(), free_port()
        procs = {"draft_b": spawn(cluster.commands["draft"], env, draft_b),
                 "target_b": spawn(cluster.commands["target"], env, target_b)}
        router = list(cluster.commands["router"])
        router[router.index("--port") + 1] = str(router_port)
        router += ["--cell", f"{cluster.draft_address},{cluster.target_address}",
                   "--cell", f"127.0.0.1:{draft_b},127.0.0.1:{target_b}"]
        procs["router"] = subprocess.Popen(router, env=env)
        address = f"127.0.0.1:{router_port}"
        try:
            wait_until(lambda: router_status(address) == SERVING, 120, "the two-cell router to serve")
            yield cluster, address, procs
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


def cell_rounds(address: str, cell: int) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            stats = monitor_pb2_grpc.RouterMonitorStub(channel).GetStats(monitor_pb2.StatsRequest(cell=cell),
                                                                          timeout=5)
    except grpc.RpcError:
        return None
    return sum(lane.rounds for lane in stats.lanes)


def run(address: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    def one(prompt: str) -> list[int]:
        with grpc.insecure_channel(address) as channel:
            return collect(stream(channel, make_request(prompt=prompt, max_tokens=max_tokens), timeout=120)).token_ids
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_load_spreads_and_requests_survive_a_lost_draft_and_target(two_cells) -> None:
    cluster, address, procs = two_cells
    expected = run(cluster.address, PROMPTS, 24)  # one cell: the reference
    assert run(address, PROMPTS, 24) == expected
    assert cell_rounds(address, 0) > 0 and cell_rounds(address, 1) > 0, "both cells must have served"

    os.kill(procs["draft_b"].pid, signal.SIGKILL)  # cell B decodes target-only from now on
    assert run(address, PROMPTS, 24) == expected

    streams = PROMPTS + PROMPTS[:6]  # 16 streams over the two cells
    reference = run(cluster.address, streams, LONG)
    served = cell_rounds(address, 1)
    with ThreadPoolExecutor(1) as pool:
        survivors = pool.submit(run, address, streams, LONG)
        wait_until(lambda: (cell_rounds(address, 1) or 0) > served + 20, 60, "cell B to be mid-stream")
        os.kill(procs["target_b"].pid, signal.SIGKILL)
        assert survivors.result(timeout=300) == reference  # every stream completes, with the same tokens
    with grpc.insecure_channel(address) as channel:  # cell A alone serves new requests
        assert collect(stream(channel, make_request(prompt=PROMPTS[0], max_tokens=24))).token_ids == expected[0]
        os.kill(cluster.procs["target"].pid, signal.SIGKILL)  # no cell left: UNAVAILABLE, not a hang
        with pytest.raises(grpc.RpcError) as failure:
            collect(stream(channel, make_request(prompt=PROMPTS[1], max_tokens=24), timeout=60))
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_routing_keeps_its_measure_when_the_stats_are_cleared() -> None:
    """GetStats(clear=True) resets the lane counters people read; the rate Cells routes by survives it, so new
    requests still go to the cell that serves faster (before, both looked unmeasured and the first one won)."""
    async def check() -> None:
        def cell() -> Scheduler:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")  # never called here
            return Scheduler(Backend("target", channel, target_pb2_grpc.TargetStub), None, mode="ar")

        slow, fast = cell(), cell()
        slow.lanes[0].round_served(8, 1.0)  # 8 sequence-rounds a second
        fast.lanes[0].round_served(8, 0.1)  # 80
        cells = Cells([slow, fast])
        assert cells.pick() == 1
        for scheduler in (slow, fast):
            scheduler.snapshot(clear=True)
            assert scheduler.lanes[0].counters.rounds == 0
        assert cells.pick() == 1
        assert cells.predicted_wait(fast) == pytest.approx(1 / 80)

    asyncio.run(check())
