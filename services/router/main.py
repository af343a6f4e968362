"""`minedraft router`: the public API, in front of a target and (for sd/psd) a draft service."""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoConfig, AutoTokenizer

from minedraft.grpc_server import CHANNEL_OPTIONS, ServiceHost
from minedraft.models.compat import check_same_tokenizer
from minedraft.models.store import resolve_model
from minedraft.protos import draft_pb2_grpc, generate_pb2_grpc, monitor_pb2_grpc, target_pb2_grpc
from services.router.monitor import MonitorServicer
from services.router.scheduler import MODES, Scheduler
from services.router.servicer import GenerationServicer

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--mode", default="psd", choices=MODES)
    parser.add_argument("--target-addr", default="127.0.0.1:50062")
    parser.add_argument("--draft-addr", default="127.0.0.1:50061")
    parser.add_argument("--tokenizer", required=True, help="the target model (preset, .gguf or folder)")
    parser.add_argument("--draft-tokenizer", default=None, help="the draft model, to check the tokenizers match")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round")
    parser.add_argument("--max-batch", type=int, default=16, help="most sequences in one lane")
    parser.add_argument("--default-max-tokens", type=int, default=256)


async def wait_serving(channel: grpc.aio.Channel, name: str, timeout_s: float = 600.0) -> None:
    """Polls a service's health until it says SERVING (the model has loaded and warmed up)."""
    stub = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if loop.time() > deadline:
            raise TimeoutError(f"{name} not serving after {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


def eos_ids_of(tokenizer, config) -> frozenset[int]:
    ids = {tokenizer.eos_token_id, getattr(config, "eos_token_id", None)}
    flat = set()
    for value in ids:
        flat.update(value if isinstance(value, list) else [value])
    return frozenset(i for i in flat if i is not None)


async def serve(args: argparse.Namespace) -> None:
    target_path = resolve_model(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    config = AutoConfig.from_pretrained(target_path)
    if args.mode != "ar" and args.draft_tokenizer:
        check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(resolve_model(args.draft_tokenizer)))
    target_channel = grpc.aio.insecure_channel(args.target_addr, options=CHANNEL_OPTIONS)
    draft_channel = grpc.aio.insecure_channel(args.draft_addr, options=CHANNEL_OPTIONS) if args.mode != "ar" else None
    scheduler = Scheduler(target_pb2_grpc.TargetStub(target_channel),
                          draft_pb2_grpc.DraftStub(draft_channel) if draft_channel else None,
                          mode=args.mode, k=args.k, max_batch=args.max_batch)
    servicer = GenerationServicer(scheduler, tokenizer, eos_ids_of(tokenizer, config),
                                  max_context=getattr(config, "max_position_embeddings", 4096),
                                  default_max_tokens=args.default_max_tokens)
    host = ServiceHost(args.host, args.port, ["minedraft.protos.Generation", "minedraft.protos.RouterMonitor"])
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, host.server)
    monitor_pb2_grpc.add_RouterMonitorServicer_to_server(MonitorServicer(scheduler), host.server)

    async def ready() -> None:
        waits = [wait_serving(target_channel, "target")]
        if draft_channel is not None:
            waits.append(wait_serving(draft_channel, "draft"))
        await asyncio.gather(*waits)
        scheduler.start()
        log.info("router ready: mode %s, k %d", args.mode, args.k)

    await host.run(ready)
    await scheduler.stop()
