"""Shared fixtures: tiny model pairs on disk and real clusters (three processes, gRPC on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from minedraft.app.cluster_config import ClusterConfig
from minedraft.app.launcher import Cluster, free_port
from minedraft.models.tiny import build_tiny_pair
from services.router.leases import CallMetadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(target, draft): a draft that disagrees now and then."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), noise=0.3)


@pytest.fixture(scope="session")
def identical_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(target, draft) with the same weights: every draft token must be accepted."""
    return build_tiny_pair(tmp_path_factory.mktemp("same"), noise=0.0)


def cluster_args(mode: str, target: Path, draft: Path, **extra) -> ClusterConfig:
    # Tiny random models give every token about 1/vocab: a stop threshold would cut every proposal to one
    # draft, so these clusters draft all k (tests/test_real_pair.py runs the product's default threshold).
    options = {"dtype": "float64", "draft_quant": "none", "target_quant": "none", "draft_stop_below": 0.0, **extra}
    return ClusterConfig.of(mode=mode, port=free_port(), target_model=str(target), draft_model=str(draft),
                            **{k: str(v) if isinstance(v, Path) else v for k, v in options.items()})


class RunningClusters:
    """Starts clusters on demand and stops them at the end. At most MAX_CACHED of them (besides the pinned
    tiny_clusters) stay up: the least recently used goes first, since every cluster holds three processes'
    memory and the real-pair tests need room for the real models."""

    MAX_CACHED = 3

    def __init__(self) -> None:
        self.clusters: dict[tuple, Cluster] = {}
        self.pinned: set[tuple] = set()

    def get(self, mode: str, pair: tuple[Path, Path], **extra) -> Cluster:
        key = (mode, pair, tuple(sorted(extra.items())))
        if key not in self.clusters:
            cached = [k for k in self.clusters if k not in self.pinned]
            for old in cached[:max(0, len(cached) - self.MAX_CACHED + 1)]:
                self.clusters.pop(old).stop()
            cluster = Cluster(cluster_args(mode, pair[0], pair[1], **extra))
            self.clusters[key] = cluster
            cluster.wait_ready(timeout_s=120)
        self.clusters[key] = self.clusters.pop(key)  # most recently used last
        return self.clusters[key]

    def stop(self) -> None:
        for cluster in self.clusters.values():
            cluster.stop()


@pytest.fixture(scope="session")
def clusters():
    running = RunningClusters()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tiny_clusters(clusters, tiny_pair) -> dict[str, Cluster]:
    """ar, sd and psd clusters on the tiny pair, booted side by side."""
    booting = {mode: Cluster(cluster_args(mode, *tiny_pair, max_batch=4)) for mode in ("ar", "sd", "psd")}
    for mode, cluster in booting.items():
        key = (mode, tiny_pair, (("max_batch", 4),))
        clusters.clusters[key] = cluster
        clusters.pinned.add(key)
    for cluster in booting.values():
        cluster.wait_ready(timeout_s=120)
    return booting


def channel_to(cluster: Cluster) -> grpc.Channel:
    return grpc.insecure_channel(cluster.address)


def internal_channel(cluster: Cluster, address: str) -> grpc.aio.Channel:
    """An asyncio channel to one of the cluster's internal services (its draft or target address), carrying the
    internal token as the cluster's own router does."""
    token = [CallMetadata([("authorization", f"Bearer {cluster.internal_token}")])]
    return grpc.aio.insecure_channel(address, interceptors=token)
