"""Common life cycle of every minedraft gRPC server: health, reflection, readiness and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from minedraft.serving.security import TokenCheck
from minedraft.serving.telemetry import server_interceptors, shutdown_tracing

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class ServiceHost:
    """A grpc.aio server whose health reports SERVING only after `ready()`."""

    def __init__(self, host: str, port: int, service_names: Iterable[str],
                 max_receive_bytes: int = MAX_MESSAGE_BYTES, credentials: grpc.ServerCredentials | None = None,
                 tokens: list[str] | None = None) -> None:
        """`credentials`: serve TLS; `tokens`: every call but health checks must carry one (security.py)."""
        options = [("grpc.max_receive_message_length", max_receive_bytes),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        checks = [TokenCheck(tokens)] if tokens else []
        self.server = grpc.aio.server(options=options, interceptors=[*checks, *server_interceptors()])
        self.health = health.aio.HealthServicer()
        self.service_names = list(service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        address = f"{host}:{port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        if not self.port:
            raise RuntimeError(f"cannot listen on {host}:{port} (in use?)")
        self.stopping = asyncio.Event()
        self.background: list[asyncio.Task] = []  # cancelled when the server stops

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(self, warm_up: Callable[[], Awaitable[None]], grace_s: float = 10.0) -> None:
        """Starts serving (NOT_SERVING), warms up, reports SERVING, then waits for SIGTERM/SIGINT."""
        await self.set_serving(False)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await warm_up()
        if not self.stopping.is_set():
            await self.set_serving(True)
        log.info("serving %s on port %d", ", ".join(self.service_names), self.port)
        await self.stopping.wait()
        log.info("draining (grace %.0fs)", grace_s)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        for task in self.background:
            task.cancel()
        shutdown_tracing()
