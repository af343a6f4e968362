"""`minedraft target`: the target model as a gRPC service."""

from __future__ import annotations

import argparse

from minedraft.engine import tensor_parallel
from minedraft.engine.device_worker import DeviceWorker
from minedraft.engine.model_runner import ModelRunner
from minedraft.engine.precision import DRAFT_ONLY_QUANTS
from minedraft.engine.slot_attention import QUERY_AT_A_TIME
from minedraft.protos import target_pb2_grpc
from minedraft.serving.model_service import add_model_args, follow_rank_zero, serve_model
from services.target.engine import DEFAULT_MAX_DRAFTS, TargetEngine
from services.target.servicer import TargetServicer


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, default_port=50062, role="target")
    parser.add_argument("--max-drafts", type=int, default=DEFAULT_MAX_DRAFTS,
                        help="most draft tokens one sequence may bring to a Verify")


async def serve(args: argparse.Namespace) -> None:
    if args.quant in DRAFT_ONLY_QUANTS:
        raise SystemExit(f"--quant {args.quant} gives a row different numbers in a verify than in a decode; the "
                         "target's numbers decide the output, so it takes a format whose rows do not depend on "
                         "the batch (none, int8, int4, w8a8)")
    if not 0 < args.max_drafts < QUERY_AT_A_TIME:  # a longer float32 verify would round as a prompt does
        raise SystemExit(f"--max-drafts must be 1..{QUERY_AT_A_TIME - 1}, not {args.max_drafts}")

    def build_engine(runner: ModelRunner) -> TargetEngine:
        return TargetEngine(runner, max_sequences=args.max_sequences, max_drafts=args.max_drafts,
                            lease_s=args.lease_s)

    if tensor_parallel.rank() > 0:  # under torchrun: rank 0 serves, the others follow its engine calls
        follow_rank_zero(args, build_engine)
        return
    servicer = TargetServicer(DeviceWorker("target"))
    await serve_model(args, "minedraft.protos.Target", servicer, target_pb2_grpc.add_TargetServicer_to_server,
                      build_engine)
