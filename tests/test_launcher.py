"""`minedraft serve` takes every option of its services, declared once by the service itself."""

from __future__ import annotations

import argparse

from minedraft.app.cluster_config import ClusterConfig
from minedraft.app.launcher import add_args, commands


def children(*argv: str) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser()
    add_args(parser)
    return commands(ClusterConfig.from_args(parser.parse_args(["--mode", "psd", *argv])), draft_port=1, target_port=2)


def test_options_the_launcher_does_not_own_pass_through_to_their_service() -> None:
    argv = children("--k-max", "9", "--rate-limit", "5", "--default-max-tokens", "100", "--drain-timeout", "3",
                    "--control-tokens", "allow", "--target-threads", "1", "--draft-cpu-linear", "torch",
                    "--draft-top-m", "16", "--target-max-drafts", "12", "--draft-max-sequences", "40")
    router, draft, target = (" ".join(argv[name]) for name in ("router", "draft", "target"))
    for option in ("--k-max 9", "--rate-limit 5.0", "--default-max-tokens 100", "--drain-timeout 3.0",
                   "--control-tokens allow"):
        assert option in router
    assert "--cpu-linear torch" in draft and "--top-m 16" in draft and "--max-sequences 40" in draft
    assert target.endswith("--threads 1 --max-drafts 12")  # after the layout's threads: the user's value wins


def test_a_service_default_is_declared_once_and_never_restated() -> None:
    router = children()["router"]
    assert "--k" not in router and "--max-batch" not in router and "--rate-limit" not in router


def test_the_demo_bench_and_tests_build_the_same_config_directly() -> None:
    config = ClusterConfig.of(mode="sd", max_batch=4, lease_s=2.0, draft_top_m=8, target_timeout=3.0)
    assert config.router == {"max_batch": 4, "target_timeout": 3.0} and config.draft == {"top_m": 8}
    assert config.lease_s == 2.0 and config.router_option("k") == 4  # the router's own default
    parser = argparse.ArgumentParser()
    add_args(parser)
    parsed = ClusterConfig.from_args(parser.parse_args(["--mode", "sd", "--max-batch", "4", "--lease-s", "2",
                                                        "--draft-top-m", "8", "--target-timeout", "3"]))
    assert parsed == config
