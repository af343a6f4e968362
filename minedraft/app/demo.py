"""`minedraft demo`: start a cluster (auto by default), stream one answer, print α, τ and tokens/s, shut down."""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc

from minedraft.app.client import Generation, absorb, make_request, stream
from minedraft.app.cluster_config import ClusterConfig
from minedraft.app.launcher import Cluster, free_port
from services.router.modes import MODES

PROMPT = "Write a Python function `fibonacci(n)` that returns the n-th Fibonacci number iteratively, with a docstring."


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--cluster-mode", default="auto", choices=MODES)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MINEDRAFT_LOG_LEVEL", "WARNING")  # the services' logs would interleave with the answer
    cluster_args = ClusterConfig.of(mode=args.cluster_mode, port=free_port())
    started = time.perf_counter()
    with Cluster(cluster_args) as cluster:
        cluster.wait_ready()
        print(f"cluster up in {time.perf_counter() - started:.1f}s ({args.cluster_mode}, "
              f"draft {cluster_args.draft_model}, target {cluster_args.target_model})\n", flush=True)
        print(f">>> {args.prompt}\n", flush=True)
        result = Generation()
        with grpc.insecure_channel(cluster.address) as channel:
            request = make_request(messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens)
            for response in stream(channel, request):
                absorb(result, response)
                if response.HasField("chunk"):
                    sys.stdout.write(response.chunk.text)
                    sys.stdout.flush()
    stats = result.stats
    drafted, accepted = int(stats["drafted_tokens"]), int(stats["accepted_tokens"])
    tokens, rounds, seconds = int(stats["completion_tokens"]), int(stats["rounds"]), float(stats["total_s"])
    print(f"\n\n[{result.finish_reason}] {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.2f} tokens/s; "
          f"alpha {accepted / max(drafted, 1):.2f} ({accepted}/{drafted} drafts accepted); "
          f"tau {tokens / max(rounds, 1):.2f} tokens per round; ttft {float(stats['ttft_s']):.2f}s")
    print(f"demo wall time {time.perf_counter() - started:.1f}s")
    return 0
