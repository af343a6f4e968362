"""One request must never hurt another, and no state outlives its owner (real processes, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import Cluster, free_port
from tests.conftest import channel_to, cluster_args
from tests.test_end_to_end import PROMPTS, held_sequences
from tests.test_faults import reference, router_status, wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def outcome(cluster: Cluster, prompt: str, max_tokens: int, **sampling) -> tuple[str, list[int]]:
    with channel_to(cluster) as channel:
        try:
            return "ok", collect(stream(channel, make_request(prompt=prompt, max_tokens=max_tokens, **sampling),
                                        timeout=120)).token_ids
        except grpc.RpcError as error:
            return error.code().name, []


def test_a_poisoned_request_among_twelve_streams_hurts_none(tiny_clusters) -> None:
    """A temperature whose inverse overflows is refused on its own; the twelve beside it are untouched."""
    expected = reference(tiny_clusters, 48)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    with ThreadPoolExecutor(13) as pool:
        poisoned = pool.submit(outcome, tiny_clusters["psd"], PROMPTS[0], 48, temperature=1e-39)
        results = list(pool.map(lambda p: outcome(tiny_clusters["psd"], p, 48), prompts))
    assert poisoned.result()[0] == "INVALID_ARGUMENT"
    assert results == [("ok", expected[p]) for p in prompts]


def test_megabyte_prompts_do_not_stall_other_streams(tiny_clusters) -> None:
    """Tokenising ~900k characters takes about a second; on the event loop it froze every stream that long."""
    cluster = tiny_clusters["ar"]
    huge = "def add(a, b):\n    return a + b\n" * 28_000
    with channel_to(cluster) as channel:
        call = stream(channel, make_request(prompt=PROMPTS[2], max_tokens=600, temperature=1.0, seed=5), timeout=120)
        next(call)
        with ThreadPoolExecutor(3) as pool:
            refused = [pool.submit(outcome, cluster, huge, 4) for _ in range(3)]
            gaps, last = [], time.monotonic()
            for _ in call:
                gaps.append(time.monotonic() - last)
                last = time.monotonic()
            codes = [f.result()[0] for f in refused]
    assert codes == ["INVALID_ARGUMENT"] * 3  # far past the context, once tokenised
    print(f"longest gap between chunks: {max(gaps):.3f}s")
    assert max(gaps) < 0.5, f"a stream stalled {max(gaps):.2f}s"


def test_a_full_static_cache_refuses_only_the_newcomer(clusters, tiny_pair, tiny_clusters) -> None:
    """Three slots, four long streams: one gets RESOURCE_EXHAUSTED, the others finish as target-only would."""
    expected = reference(tiny_clusters, 200)
    cluster = clusters.get("psd", tiny_pair, max_batch=4, kv="static", max_seqs=3)
    prompts = PROMPTS[:4]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: outcome(cluster, p, 200), prompts))
    codes = [code for code, _ in results]
    assert codes.count("RESOURCE_EXHAUSTED") >= 1 and codes.count("ok") >= 2, codes
    assert all(ids == expected[p] for p, (code, ids) in zip(prompts, results, strict=True) if code == "ok")
    wait_until(lambda: held_sequences(cluster) == (0, 0), 10, "both services to hold no sequence")
    assert outcome(cluster, PROMPTS[0], 200) == ("ok", expected[PROMPTS[0]])  # and the cache serves on


def test_a_killed_router_leaks_nothing_past_the_lease(tiny_pair) -> None:
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=4, lease_s=2)) as cluster:
        cluster.wait_ready(timeout_s=120)
        with channel_to(cluster) as channel:
            calls = [stream(channel, make_request(prompt=p, max_tokens=800, temperature=1.0, seed=1), timeout=60)
                     for p in PROMPTS[:3]]
            for call in calls:
                next(call)
            assert held_sequences(cluster) == (3, 3)
            cluster.procs["router"].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: held_sequences(cluster) == (0, 0), 8, "the leases to drop every sequence")
        print(f"released {time.monotonic() - killed:.1f}s after the router died (lease 2s)")


def test_a_stopped_target_fails_requests_within_the_timeout(tiny_pair) -> None:
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=4, target_timeout=2)) as cluster:
        cluster.wait_ready(timeout_s=120)
        target = cluster.procs["target"]
        with channel_to(cluster) as channel:
            call = stream(channel, make_request(prompt=PROMPTS[2], max_tokens=800, temperature=1.0, seed=2),
                          timeout=60)
            next(call)
            target.send_signal(signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                with pytest.raises(grpc.RpcError) as error:
                    collect(call)
                assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                assert time.monotonic() - stopped < 2 + 5
                wait_until(lambda: router_status(cluster) == NOT_SERVING, 10, "the router to report NOT_SERVING")
                with pytest.raises(grpc.RpcError) as refused:
                    collect(stream(channel, make_request(prompt="Hello", max_tokens=4), timeout=10))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                target.send_signal(signal.SIGCONT)
            wait_until(lambda: router_status(cluster) == SERVING, 30, "the router to serve again")
            assert collect(stream(channel, make_request(prompt="Hello", max_tokens=4), timeout=30)).finish_reason


def children_of(pid: int) -> dict[str, int]:
    """The `minedraft <service>` processes a `serve` started, by service name."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        argv = Path(f"/proc/{child}/cmdline").read_text().split("\0")
        if len(argv) > 3 and argv[1:3] == ["-m", "minedraft.cli"]:
            found[argv[3]] = int(child)
    return found


def test_serve_restarts_a_killed_draft_and_streams_finish(tiny_pair, tiny_clusters) -> None:
    expected = reference(tiny_clusters, 300)
    args = cluster_args("psd", *tiny_pair, max_batch=8)
    port = free_port()
    argv = [sys.executable, "-m", "minedraft.cli", "serve", "--mode", "psd", "--port", str(port),
            "--target-model", args.target_model, "--draft-model", args.draft_model, "--dtype", "float64",
            "--draft-quant", "none", "--target-quant", "none", "--max-batch", "8"]
    serve = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in serve.stdout.readline()
        address = type("Address", (), {"address": f"127.0.0.1:{port}"})
        draft_pid = children_of(serve.pid)["draft"]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(outcome, address, p, 300) for p in PROMPTS]
            time.sleep(1.0)
            os.kill(draft_pid, signal.SIGKILL)
            killed = time.monotonic()
            assert [f.result() for f in futures] == [("ok", expected[p]) for p in PROMPTS]
        assert serve.poll() is None  # the cluster serves on without its draft

        def speculating_again() -> bool:
            with grpc.insecure_channel(address.address) as channel:
                result = collect(stream(channel, make_request(prompt=PROMPTS[1], max_tokens=64)))
            assert result.token_ids == expected[PROMPTS[1]][:64]
            return int(result.stats["drafted_tokens"]) > 0

        wait_until(speculating_again, 30 - (time.monotonic() - killed), "the draft to be back and speculating")
        assert children_of(serve.pid)["draft"] != draft_pid
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=90)
