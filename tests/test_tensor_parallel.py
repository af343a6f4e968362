"""A tensor-parallel target (torchrun, 2 ranks, gloo on this CPU) in a real cluster: the same tokens as the
single-process target, and psd through it equals target-only decoding."""

from __future__ import annotations

import subprocess
import sys

from minedraft.app.launcher import Cluster, free_port
from tests.test_cells import cell_rounds, run
from tests.test_end_to_end import PROMPTS
from tests.test_faults import SERVING, router_status, wait_until


def option(command: list[str], flag: str, value: str) -> list[str]:
    """The command with `flag value` set (replaced, or added)."""
    prefixed = [c for c in command if c.startswith(f"{flag}=")]
    command = [c for c in command if c not in prefixed]
    if flag in command:
        command[command.index(flag) + 1] = value
        return command
    return [*command, flag, value]


def test_a_two_rank_target_gives_the_single_process_tokens(tiny_pair) -> None:
    from tests.conftest import cluster_args

    with Cluster(cluster_args("psd", *tiny_pair, max_batch=4, kv="dynamic")) as cluster:
        cluster.wait_ready(timeout_s=120)
        env = cluster.env_for("target")
        target_port, router_port = free_port(), free_port()
        service = cluster.commands["target"][3:]  # after `python -m minedraft.cli`
        for flag, value in (("--port", str(target_port)), ("--threads", "1"), ("--kv", "dynamic")):
            service = option(service, flag, value)
        service = [c for c in service if not c.startswith("--cpu-cores")]
        ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", "-m", "minedraft.cli", *service], env=env)
        router = option(list(cluster.commands["router"]), "--port", str(router_port))
        router += ["--cell", f"{cluster.draft_address},127.0.0.1:{target_port}"]
        front = subprocess.Popen(router, env=env)
        address = f"127.0.0.1:{router_port}"
        try:
            wait_until(lambda: router_status(address) == SERVING, 180, "the router over the TP=2 target")
            expected = run(cluster.address, PROMPTS, 24)  # psd over the single-process target
            assert run(address, PROMPTS, 24) == expected
            assert cell_rounds(address, 0) > 0
        finally:
            front.kill()
            ranks.terminate()  # torchrun passes SIGTERM to both ranks
            front.wait()
            ranks.wait(timeout=60)


def test_a_tensor_parallel_rank_refuses_what_its_shard_would_ignore(monkeypatch) -> None:
    import argparse

    import pytest

    from minedraft.engine import tensor_parallel
    from minedraft.serving import model_service

    monkeypatch.setattr(tensor_parallel, "world_size", lambda: 2)
    base = {"device": "cpu", "dtype": "float32", "kv": "dynamic", "quant": "none", "vocab": 0}
    for extra, refused in (({"quant": "int4"}, "--quant int4"), ({"vocab": 32768}, "--vocab 32768")):
        with pytest.raises(SystemExit, match=refused):  # at start, before any weights are read
            model_service.runner_loader(argparse.Namespace(**{**base, **extra}), "unused")()
    assert model_service.runner_loader(argparse.Namespace(**base), "unused").func is tensor_parallel.load_sharded
