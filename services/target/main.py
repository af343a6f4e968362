"""`minedraft target`: the target model as a gRPC service."""

from __future__ import annotations

import argparse

from minedraft.device_worker import DeviceWorker
from minedraft.model_service import add_model_args, serve_model
from minedraft.protos import target_pb2_grpc
from services.target.engine import TargetEngine
from services.target.servicer import TargetServicer


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, default_port=50062)


async def serve(args: argparse.Namespace) -> None:
    servicer = TargetServicer(DeviceWorker("target"))
    await serve_model(args, "minedraft.protos.Target", servicer, target_pb2_grpc.add_TargetServicer_to_server,
                      TargetEngine)
