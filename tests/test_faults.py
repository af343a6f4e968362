"""Overload, cancellation, deadlines and dying services: nothing lost, nothing held, nothing changed.

Every test runs real processes over gRPC on loopback and bounds its own waits.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import Cluster
from tests.conftest import channel_to, cluster_args
from tests.test_end_to_end import PROMPTS, held_sequences

MAX_TOKENS = 32


def reference(tiny_clusters, max_tokens: int = MAX_TOKENS) -> dict[str, list[int]]:
    """Target-only greedy output per prompt: what every completed stream must equal."""
    with channel_to(tiny_clusters["ar"]) as channel:
        return {p: collect(stream(channel, make_request(prompt=p, max_tokens=max_tokens))).token_ids for p in PROMPTS}


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


SERVING = health_pb2.HealthCheckResponse.SERVING


def router_status(cluster: Cluster | str) -> int:
    """The router's health (by cluster or address); -1 where it does not answer."""
    with grpc.insecure_channel(cluster if isinstance(cluster, str) else cluster.address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


def test_load_with_random_cancellations_loses_and_holds_nothing(tiny_clusters) -> None:
    expected = reference(tiny_clusters)
    cluster, rng = tiny_clusters["psd"], random.Random(5)
    plan = [(PROMPTS[i % len(PROMPTS)], rng.random() < 0.3) for i in range(64)]

    def one(item):
        prompt, cancel = item
        with channel_to(cluster) as channel:
            call = stream(channel, make_request(prompt=prompt, max_tokens=MAX_TOKENS), timeout=120)
            if cancel:
                next(call)
                call.cancel()
                return prompt, None
            return prompt, collect(call)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, plan))
    completed = [(p, r) for p, r in results if r is not None]
    assert len(completed) == sum(1 for _, cancel in plan if not cancel)
    for prompt, result in completed:
        assert result.token_ids == expected[prompt]
    wait_until(lambda: held_sequences(cluster) == (0, 0), 10, "both services to hold no sequence")


def test_deadline_frees_state(tiny_clusters) -> None:
    cluster = tiny_clusters["psd"]
    with channel_to(cluster) as channel, pytest.raises(grpc.RpcError) as error:
        collect(stream(channel, make_request(prompt=PROMPTS[2], max_tokens=800, temperature=1.0, seed=1),
                       timeout=0.3))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: held_sequences(cluster) == (0, 0), 10, "the expired sequence to be released")


def test_past_capacity_is_resource_exhausted_at_once(clusters, tiny_pair) -> None:
    cluster = clusters.get("ar", tiny_pair, max_batch=1, max_queue=1)
    with ThreadPoolExecutor(8) as pool:
        def one(_):
            started = time.monotonic()
            with channel_to(cluster) as channel:
                try:
                    collect(stream(channel, make_request(prompt=PROMPTS[2], max_tokens=400, temperature=1.0,
                                                         seed=3)))
                    return "ok", time.monotonic() - started
                except grpc.RpcError as error:
                    return error.code().name, time.monotonic() - started

        outcomes = list(pool.map(one, range(8)))
    refused = [t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]
    assert len(refused) >= 4 and max(refused) < 1.0, outcomes
    assert sum(code == "ok" for code, _ in outcomes) >= 1


def test_killed_draft_mid_load_changes_no_token_and_speculation_resumes(tiny_clusters, tiny_pair) -> None:
    long_tokens = 300  # long enough that the kill lands while every stream is still generating
    expected = reference(tiny_clusters, long_tokens)
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=8)) as cluster:
        cluster.wait_ready(timeout_s=120)
        started = threading.Barrier(len(PROMPTS) + 1)

        def one(prompt: str):
            with channel_to(cluster) as channel:
                call = stream(channel, make_request(prompt=prompt, max_tokens=long_tokens), timeout=120)
                first = next(call)
                started.wait()
                rest = collect(call)
                return list(first.chunk.token_ids) + rest.token_ids, rest.stats

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(one, p) for p in PROMPTS]
            started.wait()
            cluster.procs["draft"].send_signal(signal.SIGKILL)
            results = [f.result() for f in futures]
        for prompt, (ids, _) in zip(PROMPTS, results, strict=True):
            assert ids == expected[prompt]
        # The kill landed mid-generation: streams speculated before it and ran target-only rounds after it.
        assert any(int(s["drafted_tokens"]) > 0 and 4 * int(s["rounds"]) - int(s["drafted_tokens"]) > 20
                   for _, s in results)
        with channel_to(cluster) as channel:  # target-only while the draft is away
            alone = collect(stream(channel, make_request(prompt=PROMPTS[0], max_tokens=long_tokens)))
        assert alone.token_ids == expected[PROMPTS[0]] and int(alone.stats["drafted_tokens"]) == 0
        cluster.restart("draft")

        def speculating_again() -> bool:
            with channel_to(cluster) as channel:
                result = collect(stream(channel, make_request(prompt=PROMPTS[1], max_tokens=long_tokens)))
            assert result.token_ids == expected[PROMPTS[1]]
            return int(result.stats["drafted_tokens"]) > 0

        wait_until(speculating_again, 60, "speculation to resume once the draft is back")


def test_killed_target_fails_in_flight_then_recovers_without_restart(tiny_pair) -> None:
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=8)) as cluster:
        cluster.wait_ready(timeout_s=120)
        with channel_to(cluster) as channel:
            call = stream(channel, make_request(prompt=PROMPTS[2], max_tokens=800, temperature=1.0, seed=2),
                          timeout=60)
            next(call)
            cluster.procs["target"].send_signal(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as error:
                collect(call)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "target" in error.value.details()
            wait_until(lambda: router_status(cluster) == health_pb2.HealthCheckResponse.NOT_SERVING, 10,
                       "the router to report NOT_SERVING")
            with pytest.raises(grpc.RpcError) as refused:
                collect(stream(channel, make_request(prompt="Hello", max_tokens=4), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            cluster.restart("target")
            wait_until(lambda: router_status(cluster) == health_pb2.HealthCheckResponse.SERVING, 60,
                       "the router to report SERVING again")
            assert collect(stream(channel, make_request(prompt="Hello", max_tokens=4))).finish_reason


def test_sigterm_drains_in_flight_streams(tiny_pair) -> None:
    cluster = Cluster(cluster_args("psd", *tiny_pair, max_batch=8))
    try:
        cluster.wait_ready(timeout_s=120)
        with channel_to(cluster) as channel:
            call = stream(channel, make_request(prompt=PROMPTS[2], max_tokens=400, temperature=1.0, seed=4),
                          timeout=60)
            next(call)
            cluster.procs["router"].send_signal(signal.SIGTERM)
            result = collect(call)
        assert result.finish_reason in ("length", "eos")
        assert cluster.procs["router"].wait(timeout=30) == 0
    finally:
        cluster.stop()
