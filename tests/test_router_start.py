"""A router that is not ready yet (its services still loading) refuses requests with UNAVAILABLE at once,
rather than judging them against contexts it has not learnt and queueing them behind the start."""

import subprocess

import grpc
import pytest

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import free_ports
from minedraft.protos import generate_pb2, generate_pb2_grpc


def test_a_starting_router_refuses_requests_with_unavailable(tiny_clusters) -> None:
    cluster = tiny_clusters["sd"]
    command = list(cluster.commands["router"])
    port, nowhere = free_ports(2)
    command[command.index("--port") + 1] = str(port)
    command[command.index("--target-addr") + 1] = f"127.0.0.1:{nowhere}"  # a target that never comes up
    starting = subprocess.Popen(command, env=cluster.env_for("router"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            with pytest.raises(grpc.RpcError) as error:
                collect(stream(channel, make_request(prompt="Hello", max_tokens=4), timeout=30))
            info = generate_pb2_grpc.GenerationStub(channel).GetModelInfo(generate_pb2.ModelInfoRequest())
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in error.value.details()
        assert info.vocab_size > 0 and starting.poll() is None  # it answers what it knows, and keeps waiting
    finally:
        starting.kill()
        starting.wait()
