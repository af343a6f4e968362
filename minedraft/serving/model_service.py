"""Start-up shared by the draft and the target service: arguments, core pinning, loading, warm-up."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import grpc
import torch

from minedraft.cache_files import source_digest
from minedraft.engine import tensor_parallel
from minedraft.engine.model_runner import DTYPES, ModelRunner
from minedraft.engine.precision import QUANTS, resolve_quant
from minedraft.engine.sequence_table import DEFAULT_LEASE_S
from minedraft.engine.trimmed_head import trimmed_rows
from minedraft.metrics import serve_metrics
from minedraft.models.random_shapes import is_random
from minedraft.models.store import cache_dir, resolve_model
from minedraft.serving.grpc_server import ServiceHost
from minedraft.serving.security import add_server_tls_args, add_token_args, read_token, server_credentials
from minedraft.serving.servicing import EngineServicer
from minedraft.serving.telemetry import setup_tracing

log = logging.getLogger(__name__)


def add_model_args(parser: argparse.ArgumentParser, default_port: int, role: str) -> None:
    parser.set_defaults(role=role)  # draft or target: what `--quant auto` resolves by
    parser.add_argument("--model", required=True, help="preset (default-draft, default-target), .gguf or folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                        help="auto: bfloat16 where the device multiplies it natively, else float32")
    parser.add_argument("--quant", default="none", choices=("auto", *QUANTS),
                        help="CPU quantised linears (torch's packed int8/int4 kernels, oneDNN's int8 GEMM); auto: "
                             "what this machine's CPU runs fastest for the role (README: The CPU engine)")
    parser.add_argument("--quant-cache", default=str(cache_dir() / "quantized"),
                        help="a folder where int4/int8 linears are kept once quantised, and read back at later "
                             "starts of the same model and format (none: quantise at every start)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: every core the process may run on)")
    parser.add_argument("--cpu-cores", default=None, help="pin the process to these cores, e.g. 0 or 0-3")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--cpu-linear", default="onednn", choices=["onednn", "torch"],
                        help="CPU float32 linear kernels for large layers (precision.use_onednn_linears)")
    parser.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S,
                        help="a sequence its router has neither used nor renewed for this long is dropped (so a "
                             "crashed router leaks nothing)")
    parser.add_argument("--max-sequences", type=int, default=256,
                        help="most sequences held at once (static KV: also at most --max-seqs); more are "
                             "refused with RESOURCE_EXHAUSTED")
    add_server_tls_args(parser)
    add_token_args(parser, "internal")
    add_kv_args(parser)


def add_kv_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv", default="auto", choices=["auto", "dynamic", "static"],
                        help="KV cache layout: per-sequence tensors (dynamic) or preallocated slots (static); "
                             "auto: static")
    parser.add_argument("--max-seqs", type=int, default=64, help="static KV: most sequences held at once "
                        "(`minedraft serve`: 0 sizes it to what two full lanes hold)")
    parser.add_argument("--max-context", type=int, default=0, help="static KV: most tokens per sequence, refused at "
                        "start if it does not fit; 0: the model's context, at most 4096, shrunk to what fits")
    parser.add_argument("--kv-memory-fraction", type=float, default=None,
                        help="static KV: the most of the device's free memory the cache may take (default 0.9 on a "
                             "GPU, 0.4 on a CPU, whose RAM both services share); an unsized cache shrinks to it, a "
                             "--max-context that does not fit is refused at start")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="static KV on CUDA: replay fixed-shape steps as CUDA graphs")
    parser.add_argument("--graph-tokens", type=int, default=9,
                        help="CUDA graphs: the most tokens per row a captured step feeds (the router's k_max + 1); "
                             "every batch bucket x token bucket up to it is captured before the service is SERVING")


def parse_cores(spec: str) -> set[int]:
    cores: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def runner_loader(args: argparse.Namespace, model_path: str) -> Callable[[], ModelRunner]:
    """Loads the model as the arguments say: whole, or (under torchrun) this rank's tensor-parallel shard."""
    if tensor_parallel.world_size() > 1:
        return functools.partial(tensor_parallel.load_sharded, model_path, args.device, args.dtype, args.kv,
                                 args.quant, getattr(args, "vocab", 0))  # a draft's option only
    return functools.partial(ModelRunner.load, model_path, args.device, args.dtype, cpu_linear=args.cpu_linear,
                             quant=resolve_quant(args.quant, args.role, args.device), kv=args.kv,
                             max_seqs=args.max_seqs, max_context=args.max_context, cuda_graphs=args.cuda_graphs,
                             kv_memory_fraction=args.kv_memory_fraction, graph_tokens=args.graph_tokens,
                             quant_cache=None if args.quant_cache == "none" else Path(args.quant_cache),
                             draft_vocab=getattr(args, "vocab", 0))  # a draft's option only


def follow_rank_zero(args: argparse.Namespace, build_engine: Callable[[ModelRunner], object]) -> None:
    """A tensor-parallel rank other than 0: its shard, and rank 0's engine calls, until rank 0 stops."""
    if args.cpu_cores:
        os.sched_setaffinity(0, parse_cores(args.cpu_cores))
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    engine = build_engine(runner_loader(args, str(resolve_model(args.model)))())
    tensor_parallel.follow(engine)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def engine_key(args: argparse.Namespace, model_path: str, runner: ModelRunner, threads: int) -> str:
    """Everything a stage's speed depends on here, as one string: measurements keyed by it (the router's cached
    calibration) stay valid exactly as long as it does."""
    static = runner.static
    return json.dumps({"model": model_path, "dtype": str(runner.model.dtype), "device": args.device,
                       "quant": resolve_quant(args.quant, args.role, args.device), "threads": threads,
                       # not the context: fitted to free memory, it moves between starts; stage times do not
                       "kv": f"static {static.max_seqs} slots, {static.attention}" if static else "dynamic",
                       "cpu": cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "",
                       "cpu_linear": args.cpu_linear, "cuda_graphs": [args.cuda_graphs, args.graph_tokens],
                       "trimmed_rows": trimmed_rows(runner.model),
                       "code": source_digest(Path(__file__).parents[1])}, sort_keys=True)


async def serve_model(args: argparse.Namespace, service_name: str, servicer: EngineServicer,
                      add_to_server: Callable[[object, grpc.aio.Server], None],
                      build_engine: Callable[[ModelRunner], object]) -> None:
    """Serves NOT_SERVING while the model loads and warms up on the device thread, then SERVING."""
    if args.cpu_cores:
        os.sched_setaffinity(0, parse_cores(args.cpu_cores))
    servicer.worker.threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(servicer.worker.threads)
    setup_tracing(service_name.rsplit(".", 1)[-1].lower())
    serve_metrics(args.metrics_port, args.host)
    token = read_token(args, "internal")
    host = ServiceHost(args.host, args.port, [service_name], credentials=server_credentials(args),
                       tokens=[token] if token else None)
    add_to_server(servicer, host.server)

    async def load_and_warm() -> None:
        model_path = args.model if is_random(args.model) else str(resolve_model(args.model))
        load = runner_loader(args, model_path)
        runner, _, load_ms, _ = await servicer.worker.run(load)
        engine = build_engine(runner) if tensor_parallel.world_size() == 1 else tensor_parallel.Mirror(
            build_engine(runner))
        await servicer.worker.run(engine.warm_up)
        servicer.engine, servicer.engine_key = engine, engine_key(args, model_path, runner, servicer.worker.threads)
        reaper = asyncio.create_task(servicer.reap_expired(), name="reap-expired")
        host.background.append(reaper)
        log.info("%s ready: %s on %s (loaded in %.1fs)", service_name, args.model, args.device, load_ms / 1e3)

    await host.run(load_and_warm)
    servicer.worker.shutdown()

