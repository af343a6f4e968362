"""Drives one mode: start its cluster, replay the workload over the public API, read the router's stats."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import random
import time

import grpc
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from minedraft.app.bench.metrics import Event, RequestRecord
from minedraft.app.client import make_request
from minedraft.app.cluster_config import ClusterConfig
from minedraft.app.launcher import Cluster, free_port
from minedraft.protos import generate_pb2, generate_pb2_grpc, monitor_pb2, monitor_pb2_grpc

log = logging.getLogger(__name__)

# A bench mode: the cluster's router mode, how many times the concurrency it holds (the seed paper's psd at 2C),
# and whether TETRIS selection is on.
MODE_SPECS = {"ar": ("ar", 1, False), "sd": ("sd", 1, False), "psd": ("psd", 1, False), "auto": ("auto", 1, False),
              "psd2c": ("psd", 2, False), "tetris": ("psd", 1, True), "tetris2c": ("psd", 2, True)}


async def _one(stub: generate_pb2_grpc.GenerationStub, item: dict, max_tokens: int,
               ignore_eos: bool = False, index: int = -1) -> RequestRecord:
    request = make_request(prompt=item.get("prompt"), messages=item.get("messages"), max_tokens=max_tokens,
                           ignore_eos=ignore_eos)
    submitted, first, tokens, digest = time.time(), None, 0, hashlib.sha1()
    try:
        async for response in stub.Generate(request):
            if response.HasField("chunk") and response.chunk.token_ids:
                first = first or time.time()
                tokens += len(response.chunk.token_ids)
                digest.update(b"".join(t.to_bytes(4, "little") for t in response.chunk.token_ids))
            elif response.HasField("final"):
                s = response.final.stats
                return RequestRecord(submitted, first, time.time(), tokens, s.drafted_tokens, s.accepted_tokens,
                                     s.rounds, index=index, digest=digest.hexdigest()[:16])
    except grpc.aio.AioRpcError as error:
        return RequestRecord(submitted, first, time.time(), tokens, error=f"{error.code().name}: {error.details()}")
    return RequestRecord(submitted, first, time.time(), tokens, error="stream ended without a final message")


async def drive(address: str, items: list[dict], concurrency: int, max_tokens: int, rate: float | None,
                label: str, seed: int = 0, ignore_eos: bool = False) -> list[RequestRecord]:
    """Closed loop (C streams, each starting the next prompt when one ends) or open loop (Poisson, rate/s)."""
    records: list[RequestRecord] = []
    bar = tqdm(total=len(items), desc=label, unit="req", leave=False)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        async def run(index: int, item: dict) -> None:
            records.append(await _one(stub, item, max_tokens, ignore_eos, index=index))
            bar.update(1)

        if rate:
            arrivals = random.Random(seed)
            tasks = []
            for index, item in enumerate(items):
                tasks.append(asyncio.create_task(run(index, item)))
                await asyncio.sleep(arrivals.expovariate(rate))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(list(enumerate(items))))

            async def stream_worker() -> None:
                while queue:
                    await run(*queue.pop())

            await asyncio.gather(*(stream_worker() for _ in range(concurrency)))
    bar.close()
    return records


async def held_context(address: str) -> int:
    """The tokens one sequence may hold in this cluster: its caches are sized to what fits in memory."""
    async with grpc.aio.insecure_channel(address) as channel:
        info = await generate_pb2_grpc.GenerationStub(channel).GetModelInfo(generate_pb2.ModelInfoRequest())
    return info.max_context


async def router_stats(address: str, clear: bool) -> monitor_pb2.RouterStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return await monitor_pb2_grpc.RouterMonitorStub(channel).GetStats(monitor_pb2.StatsRequest(clear=clear))


def cluster_args(args: argparse.Namespace, mode: str, max_batch: int) -> ClusterConfig:
    """The cluster of a bench mode (MODE_SPECS)."""
    cluster_mode, _, tetris = MODE_SPECS[mode]
    return ClusterConfig.of(
        mode=cluster_mode, port=free_port(), tetris_extra=args.tetris_extra if tetris else 0, k=args.k,
        draft_stop_below=args.draft_stop_below,
        max_batch=max_batch, draft_model=args.draft_model,
        target_model=args.target_model, dtype=args.dtype, draft_quant=args.draft_quant, target_quant=args.target_quant,
        cpu_layout=args.cpu_layout, device=args.device, draft_device=args.draft_device, tokenizer=args.tokenizer,
        kv=args.kv, max_context=args.max_context, draft_vocab=args.draft_vocab)


def run_mode(args: argparse.Namespace, mode: str, items: list[dict], concurrency: int) -> dict:
    """Returns the raw material of one mode's summary: records, lane counters and device events."""
    # Lanes are capped at the concurrency, so one lane (sd) can hold all C and two lanes (psd) C/2 each.
    with Cluster(cluster_args(args, mode, max_batch=concurrency)) as cluster:
        cluster.wait_ready()
        warmup = items[:max(1, min(args.warmup_requests, len(items)))]
        # As long as the measured requests: an adaptive mode (auto) starts from the traffic it is measured on (after
        # answers of 4 tokens, whose draft prefill dwarfs them, it began a C = 1 run target-only and stayed there)
        asyncio.run(drive(cluster.address, warmup, len(warmup), args.max_tokens, None, f"{mode} warm-up",
                          ignore_eos=args.ignore_eos))
        asyncio.run(router_stats(cluster.address, clear=True))
        records = asyncio.run(drive(cluster.address, items, concurrency, args.max_tokens, args.rate,
                                    f"{mode} C={concurrency}", ignore_eos=args.ignore_eos))
        stats = asyncio.run(router_stats(cluster.address, clear=False))
        context = asyncio.run(held_context(cluster.address))
    failed = [r.error for r in records if r.error]
    if failed:  # left out of the throughput: a comparison with them is not like for like
        log.warning("%s: %d of %d requests failed (context %d), first: %s", mode, len(failed), len(records),
                    context, failed[0])
    lanes = [MessageToDict(lane, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
             for lane in stats.lanes]
    for lane in lanes:
        for key in ("rounds", "propose_calls", "verify_calls", "sequences_in_rounds"):
            lane[key] = int(lane[key])
    events = [Event(e.device, e.kind, e.lane, e.start, e.end) for e in stats.events]
    return {"records": records, "lanes": lanes, "events": events, "context": context}
