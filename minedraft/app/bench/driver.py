"""Drives one mode: start its cluster, replay the workload over the public API, read the router's stats."""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import grpc
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from minedraft.app.bench.metrics import Event, RequestRecord
from minedraft.app.client import make_request
from minedraft.app.launcher import Cluster, free_port
from minedraft.app.launcher import add_args as add_cluster_args
from minedraft.protos import generate_pb2_grpc, monitor_pb2, monitor_pb2_grpc


async def _one(stub: generate_pb2_grpc.GenerationStub, item: dict, max_tokens: int) -> RequestRecord:
    request = make_request(prompt=item.get("prompt"), messages=item.get("messages"), max_tokens=max_tokens)
    submitted, first, tokens = time.time(), None, 0
    try:
        async for response in stub.Generate(request):
            if response.HasField("chunk") and response.chunk.token_ids:
                first = first or time.time()
                tokens += len(response.chunk.token_ids)
            elif response.HasField("final"):
                s = response.final.stats
                return RequestRecord(submitted, first, time.time(), tokens, s.drafted_tokens, s.accepted_tokens,
                                     s.rounds)
    except grpc.aio.AioRpcError as error:
        return RequestRecord(submitted, first, time.time(), tokens, error=f"{error.code().name}: {error.details()}")
    return RequestRecord(submitted, first, time.time(), tokens, error="stream ended without a final message")


async def drive(address: str, items: list[dict], concurrency: int, max_tokens: int, rate: float | None,
                label: str, seed: int = 0) -> list[RequestRecord]:
    """Closed loop (C streams, each starting the next prompt when one ends) or open loop (Poisson, rate/s)."""
    records: list[RequestRecord] = []
    bar = tqdm(total=len(items), desc=label, unit="req", leave=False)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        async def run(item: dict) -> None:
            records.append(await _one(stub, item, max_tokens))
            bar.update(1)

        if rate:
            arrivals = random.Random(seed)
            tasks = []
            for item in items:
                tasks.append(asyncio.create_task(run(item)))
                await asyncio.sleep(arrivals.expovariate(rate))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(items))

            async def stream_worker() -> None:
                while queue:
                    await run(queue.pop())

            await asyncio.gather(*(stream_worker() for _ in range(concurrency)))
    bar.close()
    return records


async def router_stats(address: str, clear: bool) -> monitor_pb2.RouterStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return await monitor_pb2_grpc.RouterMonitorStub(channel).GetStats(monitor_pb2.StatsRequest(clear=clear))


def cluster_args(args: argparse.Namespace, mode: str, max_batch: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cluster_args(parser)
    return parser.parse_args([
        "--mode", mode, "--port", str(free_port()), "--k", str(args.k), "--max-batch", str(max_batch),
        "--draft-model", args.draft_model, "--target-model", args.target_model, "--dtype", args.dtype,
        "--draft-quant", args.draft_quant, "--target-quant", args.target_quant, "--cpu-layout", args.cpu_layout,
        "--device", args.device, *(["--draft-device", args.draft_device] if args.draft_device else []),
        *(["--tokenizer", args.tokenizer] if args.tokenizer else []), "--kv", args.kv,
        "--max-context", str(args.max_context)])


def run_mode(args: argparse.Namespace, mode: str, items: list[dict], concurrency: int) -> dict:
    """Returns the raw material of one mode's summary: records, lane counters and device events."""
    cluster_mode = "psd" if mode == "psd2c" else mode
    # Lanes are capped at the concurrency, so one lane (sd) can hold all C and two lanes (psd) C/2 each.
    with Cluster(cluster_args(args, cluster_mode, max_batch=concurrency)) as cluster:
        cluster.wait_ready()
        warmup = items[:max(1, min(args.warmup_requests, len(items)))]
        asyncio.run(drive(cluster.address, warmup, len(warmup), 4, None, f"{mode} warm-up"))
        asyncio.run(router_stats(cluster.address, clear=True))
        records = asyncio.run(drive(cluster.address, items, concurrency, args.max_tokens, args.rate,
                                    f"{mode} C={concurrency}"))
        stats = asyncio.run(router_stats(cluster.address, clear=False))
    lanes = [MessageToDict(lane, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
             for lane in stats.lanes]
    for lane in lanes:
        for key in ("rounds", "propose_calls", "verify_calls", "sequences_in_rounds"):
            lane[key] = int(lane[key])
    events = [Event(e.device, e.kind, e.lane, e.start, e.end) for e in stats.events]
    return {"records": records, "lanes": lanes, "events": events}
