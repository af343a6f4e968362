"""Several routers over one pair of model services, balanced by the client (gRPC round_robin), one killed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import Cluster, free_port
from minedraft.protos import monitor_pb2, monitor_pb2_grpc
from tests.conftest import channel_to, cluster_args
from tests.test_end_to_end import PROMPTS
from tests.test_faults import SERVING, router_status, wait_until

MAX_TOKENS = 24


@pytest.fixture
def two_routers(tiny_pair):
    """A psd cluster and a second router process on its draft and target (its own owner id)."""
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=4)) as cluster:
        cluster.wait_ready(timeout_s=120)
        command, port = list(cluster.commands["router"]), free_port()
        command[command.index("--port") + 1] = str(port)
        second = subprocess.Popen(command, env=cluster.env_for("router"))
        try:
            address = f"127.0.0.1:{port}"
            with grpc.insecure_channel(address) as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
            wait_until(lambda: router_status(address) == SERVING, 60, "the second router to serve")
            yield cluster, second, address
        finally:
            if second.poll() is None:
                second.kill()
            second.wait()


def rounds(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            stats = monitor_pb2_grpc.RouterMonitorStub(channel).GetStats(monitor_pb2.StatsRequest(), timeout=5)
    except grpc.RpcError:
        return None
    return sum(lane.rounds for lane in stats.lanes)


def balanced_channel(*addresses: str) -> grpc.Channel:
    """What a client of several routers runs: every address resolved, calls spread round-robin over the ready ones."""
    return grpc.insecure_channel("ipv4:" + ",".join(addresses), options=[("grpc.lb_policy_name", "round_robin")])


def generate_with_retry(channel: grpc.Channel, prompt: str, attempts: int = 3) -> list[int]:
    """Greedy requests are idempotent: one cut by a router's death is sent again (to a router still up)."""
    for attempt in range(attempts):
        try:
            return collect(stream(channel, make_request(prompt=prompt, max_tokens=MAX_TOKENS), timeout=60)).token_ids
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def test_clients_spread_over_two_routers_and_survive_one_killed(two_routers) -> None:
    cluster, second, second_address = two_routers
    with channel_to(cluster) as channel:
        expected = [collect(stream(channel, make_request(prompt=p, max_tokens=MAX_TOKENS))).token_ids
                    for p in PROMPTS]
    before = (rounds(cluster.address), rounds(second_address))
    with balanced_channel(cluster.address, second_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda p: generate_with_retry(channel, p), PROMPTS)) == expected
        after = (rounds(cluster.address), rounds(second_address))
        assert after[0] > before[0] and after[1] > before[1], "both routers must have served"
        with ThreadPoolExecutor(4) as pool:  # kill -9 the second router while requests are in flight
            results = [pool.submit(generate_with_retry, channel, p) for p in PROMPTS * 2]
            time.sleep(0.3)
            os.kill(second.pid, signal.SIGKILL)
            assert [r.result(timeout=120) for r in results] == expected * 2
    assert cluster.procs["router"].poll() is None  # the first router, and the services, never noticed
