"""`minedraft router`: the public API, in front of a target and (for sd/psd) a draft service."""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
from transformers import AutoConfig, AutoTokenizer

from minedraft.metrics import serve_metrics
from minedraft.models.compat import check_same_tokenizer
from minedraft.models.store import cache_dir, resolve_model
from minedraft.protos import common_pb2, draft_pb2_grpc, generate_pb2, monitor_pb2_grpc, target_pb2_grpc
from minedraft.serving.grpc_server import CHANNEL_OPTIONS, ServiceHost
from minedraft.serving.security import (
    add_backend_tls_args,
    add_server_tls_args,
    add_token_args,
    backend_credentials,
    bearer,
    read_token,
    server_credentials,
)
from minedraft.serving.telemetry import client_interceptors, setup_tracing
from services.router.admission import Admission
from services.router.backends import Backend
from services.router.calibration import MAX_AGE_DAYS, CalibrationCache
from services.router.cells import Cells
from services.router.drafting import DRAFT_STOP_BELOW, PREFILL_S_PER_TOKEN
from services.router.leases import CallMetadata, keep_leases, new_owner_id, owner_metadata
from services.router.modes import MODES
from services.router.monitor import MonitorServicer
from services.router.scheduler import Scheduler
from services.router.servicer import GenerationServicer, add_generation_servicer

log = logging.getLogger(__name__)
PUBLIC_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # larger requests get RESOURCE_EXHAUSTED from gRPC itself
# A restarted service is noticed within a second, not after gRPC's default reconnect backoff (up to 2 minutes).
BACKEND_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 200),
                           ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


def probability(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is not a probability (0 to 1)")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (NaN fails too)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--mode", default="auto", choices=MODES)
    parser.add_argument("--target-addr", default="127.0.0.1:50062")
    parser.add_argument("--draft-addr", default="127.0.0.1:50061")
    parser.add_argument("--cell", action="append", default=[], metavar="DRAFT_ADDR,TARGET_ADDR",
                        help="a draft/target pair (repeat for several; ',TARGET_ADDR' for one without a draft); "
                             "new requests go to the cell they would wait least in, and move to another cell if "
                             "theirs loses its target (default: one cell, --draft-addr and --target-addr)")
    parser.add_argument("--tokenizer", required=True, help="the target model (preset, .gguf or folder)")
    parser.add_argument("--draft-tokenizer", default=None, help="the draft model, to check the tokenizers match")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round (auto: the calibration's k)")
    parser.add_argument("--k-max", type=int, default=8, help="auto: the largest k the policy may choose")
    parser.add_argument("--tetris-extra", type=int, default=0,
                        help="TETRIS: draft k + this many tokens per sequence and verify only the lane's k x size "
                             "most likely draft positions (0: off)")
    parser.add_argument("--draft-stop-below", type=probability, default=DRAFT_STOP_BELOW,
                        help="stop drafting a sequence after a token the draft gave less than this probability "
                             "(0: always draft k; speed only, never output)")
    parser.add_argument("--max-batch", type=int, default=16, help="most sequences in one lane")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting for a lane")
    parser.add_argument("--rate-limit", type=float, default=None, help="most new requests per second")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--calibration-cache", default=str(cache_dir() / "calibration"),
                        help="auto: a folder of start-up calibrations, each read back when the draft's and the "
                             "target's engines and the router's settings are the same again (none: always measure)")
    parser.add_argument("--recalibrate", action="store_true", help="auto: measure at start even when a cached "
                        "calibration matches, and cache the new one in its place (or none, where it is inconsistent)")
    parser.add_argument("--calibration-max-age", type=positive_float, default=MAX_AGE_DAYS, metavar="DAYS",
                        help="auto: a cached calibration older than this is measured again, and removed")
    parser.add_argument("--max-context", type=int, default=None,
                        help="most tokens per sequence; default: the target model's context, lowered at start to "
                             "what the draft's and the target's caches hold")
    parser.add_argument("--draft-timeout", type=float, default=10.0, help="seconds before a draft call counts as "
                        "failed (the round then runs target-only; a Prefill gets "
                        f"{PREFILL_S_PER_TOKEN} s more per token sent)")
    parser.add_argument("--target-timeout", type=float, default=30.0,
                        help="seconds before a Verify counts as failed (a Prefill gets "
                             f"{PREFILL_S_PER_TOKEN} s more per prompt token): its requests fail and the router "
                             "reports NOT_SERVING until the target answers its health checks again")
    parser.add_argument("--max-lane-tokens", type=int, default=0,
                        help="most prompt + max_tokens tokens the sequences of one lane may hold; a request that "
                             "would pass it waits its turn (0: only --max-batch and the services' caches bound it)")
    parser.add_argument("--draft-prefill-tokens", type=int, default=512,
                        help="most prompt tokens in one draft prefill call (longer batches go in chunks, so "
                             "no call's duration grows with the batch)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--share-cores", type=int, default=0,
                        help="draft and target share this many CPU cores: a call asks for all of them when it "
                             "runs alone, half when the other service runs beside it (0: no hints)")
    parser.add_argument("--control-tokens", default="text", choices=["text", "allow"],
                        help="control-token text (<|im_start|>…) in prompts and chat messages: tokenised as plain "
                             "text (default), or allowed to become control tokens (raw prompts that carry their "
                             "own chat template)")
    add_server_tls_args(parser)
    add_backend_tls_args(parser)
    add_token_args(parser, "internal", "api", "admin")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds in-flight streams get to "
                        "finish after SIGTERM")


def eos_ids_of(tokenizer, config) -> frozenset[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        ids.update(value if isinstance(value, list) else [value])
    return frozenset(i for i in ids if i is not None)


async def serve(args: argparse.Namespace) -> None:
    target_path = resolve_model(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    config = AutoConfig.from_pretrained(target_path)
    if args.mode != "ar" and args.draft_tokenizer:
        check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(resolve_model(args.draft_tokenizer)))
    setup_tracing("router")
    serve_metrics(args.metrics_port, args.host)
    public = ["minedraft.protos.Generation", "minedraft.protos.RouterMonitor"]
    api_key, admin_key, internal_token = (read_token(args, kind) for kind in ("api", "admin", "internal"))
    host = ServiceHost(args.host, args.port, public, max_receive_bytes=PUBLIC_MAX_REQUEST_BYTES,
                       credentials=server_credentials(args),
                       tokens=[key for key in (api_key, admin_key) if key] if api_key else None)

    def on_target_change(up: bool) -> None:  # the router serves while one of its cells' targets does
        asyncio.get_running_loop().create_task(host.set_serving(cells.target_up))

    owner, credentials = new_owner_id(), backend_credentials(args)
    metadata = [owner_metadata(owner), *([bearer(internal_token)] if internal_token else [])]

    def channel(address: str) -> grpc.aio.Channel:
        interceptors = [CallMetadata(metadata), *client_interceptors()]
        if credentials:
            return grpc.aio.secure_channel(address, credentials, options=BACKEND_CHANNEL_OPTIONS,
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=BACKEND_CHANNEL_OPTIONS, interceptors=interceptors)

    def cell(index: int, draft_addr: str, target_addr: str) -> Scheduler:
        suffix = f"-{index}" if index else ""  # cell 0 keeps the plain names (metrics, logs)
        target = Backend(f"target{suffix}", channel(target_addr), target_pb2_grpc.TargetStub,
                         on_change=on_target_change)
        mode = args.mode if draft_addr else "ar"  # a cell without a draft decodes target-only
        draft = Backend(f"draft{suffix}", channel(draft_addr), draft_pb2_grpc.DraftStub) if mode != "ar" else None
        return Scheduler(target, draft, mode=mode, k=args.k, max_batch=args.max_batch,
                         draft_timeout_s=args.draft_timeout, k_max=args.k_max,
                         draft_prefill_tokens=args.draft_prefill_tokens, share_cores=args.share_cores,
                         target_timeout_s=args.target_timeout, max_lane_tokens=args.max_lane_tokens,
                         tetris_extra=args.tetris_extra, draft_stop_below=args.draft_stop_below)

    pairs = [parse_cell(spec) for spec in args.cell] or [(args.draft_addr, args.target_addr)]
    cells = Cells([cell(i, draft_addr, target_addr) for i, (draft_addr, target_addr) in enumerate(pairs)],
                  ready=False)
    scheduler = cells.first
    lanes = len(scheduler.lanes)
    admission = Admission(max_sequences=len(cells) * lanes * args.max_batch + args.max_queue,
                          rate_per_s=args.rate_limit)
    info = generate_pb2.ModelInfo(target_model=args.tokenizer, draft_model=args.draft_tokenizer or "",
                                  tokenizer=args.tokenizer, vocab_size=config.vocab_size,
                                  eos_token_ids=sorted(eos_ids_of(tokenizer, config)))
    servicer = GenerationServicer(cells, tokenizer, info,
                                  max_context=min(getattr(config, "max_position_embeddings", 4096),
                                                  args.max_context or 1 << 30),
                                  admission=admission, default_max_tokens=args.default_max_tokens,
                                  control_tokens=args.control_tokens == "allow")
    add_generation_servicer(servicer, host.server)
    monitor = MonitorServicer(cells, admin_key=admin_key, open_clear=not (api_key or admin_key))
    monitor_pb2_grpc.add_RouterMonitorServicer_to_server(monitor, host.server)

    async def ready() -> None:
        for each in cells.schedulers:
            await asyncio.gather(*(b.wait_serving() for b in (each.target, each.draft) if b is not None))
            engines = []
            for backend in (each.target, each.draft):  # what each computes, and the longest sequence it holds
                held = await backend.stub.Renew(common_pb2.RenewRequest(), timeout=10) if backend else None
                if held:
                    backend.max_context = held.max_context
                    engines.append(held.engine)
            await each.calibrate(CalibrationCache(args.calibration_cache, args.recalibrate, engines,
                                                  args.calibration_max_age)
                                 if args.calibration_cache != "none" else None)
            each.start()
            host.background.append(asyncio.create_task(keep_leases(each), name=f"keep-leases-{each.target.name}"))
        cells.ready = True
        log.info("router %s ready: mode %s, k %d, %d cell(s) of %d lane(s) of up to %d, context %d", owner,
                 args.mode, args.k, len(cells), lanes, args.max_batch, servicer.max_context)

    await host.run(ready, grace_s=args.drain_timeout)
    for each in cells.schedulers:
        await each.stop()


def parse_cell(spec: str) -> tuple[str, str]:
    """`DRAFT_ADDR,TARGET_ADDR`, or `,TARGET_ADDR` for a cell without a draft."""
    draft_addr, comma, target_addr = spec.partition(",")
    if not comma or not target_addr:
        raise SystemExit(f"--cell {spec!r}: give DRAFT_ADDR,TARGET_ADDR (or ,TARGET_ADDR without a draft)")
    return draft_addr, target_addr
