"""`minedraft draft`: the draft model as a gRPC service."""

from __future__ import annotations

import argparse

from minedraft.engine.device_worker import DeviceWorker
from minedraft.protos import draft_pb2_grpc
from minedraft.serving.model_service import add_model_args, serve_model
from services.draft.engine import DEFAULT_MAX_K, DraftEngine
from services.draft.servicer import DraftServicer


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, default_port=50061, role="draft")
    parser.add_argument("--top-m", type=int, default=32, help="support size of the sparse draft distribution")
    parser.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="most tokens one Propose may ask for")
    parser.add_argument("--vocab", type=int, default=0,
                        help="draft only the first N token ids and the special tokens: a smaller output head, a "
                             "faster draft step, a token outside never proposed (output unchanged; 0: all)")


async def serve(args: argparse.Namespace) -> None:
    servicer = DraftServicer(DeviceWorker("draft"))
    await serve_model(args, "minedraft.protos.Draft", servicer, draft_pb2_grpc.add_DraftServicer_to_server,
                      lambda runner: DraftEngine(runner, top_m=args.top_m, max_sequences=args.max_sequences,
                                                 max_k=args.max_k, lease_s=args.lease_s))
