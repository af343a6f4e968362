"""`minedraft serve`: draft, target and router as three processes on loopback, supervised, stopped together."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minedraft.app.client import open_channel
from minedraft.app.cluster_config import ClusterConfig
from minedraft.app.forwarding import forward
from minedraft.app.supervisor import Supervisor
from minedraft.engine.precision import resolve_quant
from minedraft.serving.security import TOKEN_ENV


def add_args(parser: argparse.ArgumentParser) -> None:
    ClusterConfig.add_arguments(parser)


ROUTER_SERVICE = "minedraft.protos.Generation"


def free_ports(count: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """Distinct free loopback ports: every socket stays bound until all are picked."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] not in exclude:
                ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


SPARE_SLOTS = 2


def cpu_layout(config: ClusterConfig) -> str:
    """The layout this cluster runs: `auto` resolved by mode (see --cpu-layout); none off the CPU."""
    if config.device != "cpu" or (config.draft_device or "cpu") != "cpu" or len(os.sched_getaffinity(0)) < 2:
        return "none"
    if config.cpu_layout != "auto":
        return config.cpu_layout
    return {"ar": "shared", "psd": "split"}.get(config.mode, "shared")


def core_args(layout: str) -> tuple[list[str], list[str], list[str]]:
    """Extra arguments for the draft, the target and the router under a CPU layout."""
    cores = sorted(os.sched_getaffinity(0))
    if layout == "split":
        half = len(cores) // 2
        draft, target = cores[:half], cores[half:]
        return ([f"--cpu-cores={','.join(map(str, draft))}", f"--threads={len(draft)}"],
                [f"--cpu-cores={','.join(map(str, target))}", f"--threads={len(target)}"], [])
    if layout == "shared":
        every = [f"--threads={len(cores)}"]
        return every, every, [f"--share-cores={len(cores)}"]
    return [], [], []


def commands(config: ClusterConfig, draft_port: int, target_port: int) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "minedraft.cli"]
    # two full lanes, and room for a warm-up
    max_seqs = config.max_seqs or 2 * config.router_option("max_batch") + SPARE_SLOTS
    common = ["--dtype", config.dtype, "--host", "127.0.0.1", "--kv", config.kv, "--max-seqs", str(max_seqs),
              "--lease-s", str(config.lease_s),
              "--max-context", str(config.max_context), "--cuda-graphs" if config.cuda_graphs else "--no-cuda-graphs"]
    same_gpu = config.device.startswith("cuda") and (config.draft_device or config.device) == config.device
    fraction = config.kv_memory_fraction or (0.45 if same_gpu else None)  # two caches on one GPU: half each
    if fraction:
        common += ["--kv-memory-fraction", str(fraction)]
    draft_cores, target_cores, router_cores = core_args(cpu_layout(config))
    draft_device = config.draft_device or config.device
    draft = [*cli, "draft", "--model", config.draft_model, "--port", str(draft_port), "--device", draft_device,
             "--quant", resolve_quant(config.draft_quant, "draft", draft_device), *common, *draft_cores,
             *forward(config.draft, "draft")]
    target = [*cli, "target", "--model", config.target_model, "--port", str(target_port), "--device", config.device,
              "--quant", resolve_quant(config.target_quant, "target", config.device), *common, *target_cores,
              *forward(config.target, "target")]
    router = [*cli, "router", "--mode", config.mode, "--port", str(config.port), "--host", config.host,
              "--target-addr", f"127.0.0.1:{target_port}", "--draft-addr", f"127.0.0.1:{draft_port}",
              "--tokenizer", config.tokenizer or config.target_model,
              "--draft-tokenizer", config.tokenizer or config.draft_model, *router_cores,
              *forward(config.router, "router")]
    if config.max_context:  # else the router learns what the services' caches hold
        router += ["--max-context", str(config.max_context)]
    if config.tls_dir:
        tls = Path(config.tls_dir)
        for cmd in (draft, target):
            cmd += ["--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key"),
                    "--tls-client-ca", str(tls / "ca.pem")]
        router += ["--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key"),
                   "--backend-ca", str(tls / "ca.pem"), "--backend-cert", str(tls / "client.pem"),
                   "--backend-key", str(tls / "client.key"),
                   *(["--tls-client-ca", str(tls / "ca.pem")] if config.public_mtls else [])]
    for flag, path in (("--api-key-file", config.api_key_file), ("--admin-key-file", config.admin_key_file)):
        router += [flag, str(path)] if path else []
    if config.metrics_port:
        for offset, cmd in enumerate((router, draft, target)):
            cmd += ["--metrics-port", str(config.metrics_port + offset)]
    procs = {"target": target, "router": router}
    if config.http_port:
        procs["http"] = [*cli, "http", "--router", f"127.0.0.1:{config.port}", "--host", config.host,
                         "--port", str(config.http_port), "--model-name", model_name(config.target_model),
                         *(["--tls-ca", str(Path(config.tls_dir) / "ca.pem")] if config.tls_dir else []),
                         *(["--tls-cert", str(Path(config.tls_dir) / "client.pem"), "--tls-key",
                            str(Path(config.tls_dir) / "client.key")] if config.tls_dir and config.public_mtls else [])]
    if config.mode != "ar":
        procs = {"draft": draft, **procs}
    return procs


def model_name(model: str) -> str:
    """The id the HTTP API gives a model: its preset name, or its file or folder name."""
    return Path(model).stem if model.endswith(".gguf") else Path(model).name


class Cluster:
    """The three processes. stop() drains the router first (its streams finish), then the model services."""

    def __init__(self, config: ClusterConfig) -> None:
        self.address = f"{config.host}:{config.port}"
        self.http_address = f"{config.host}:{config.http_port}" if config.http_port else None
        spare = iter(free_ports(2, exclude=(config.port,)))
        self.draft_address = f"127.0.0.1:{config.draft_port or next(spare)}"
        self.target_address = f"127.0.0.1:{config.target_port or next(spare)}"
        self.commands = commands(config, int(self.draft_address.rsplit(":", 1)[1]),
                                 int(self.target_address.rsplit(":", 1)[1]))
        # Only this cluster's router may call its draft and target: a token made for it, handed over in the
        # environment (never argv, which `ps` shows).
        self.internal_token = secrets.token_urlsafe(24)
        self.env = {**os.environ, TOKEN_ENV["internal"]: self.internal_token}
        self.tls = (Path(config.tls_dir), config.public_mtls) if config.tls_dir else None
        self.procs = {name: subprocess.Popen(cmd, env=self.env_for(name)) for name, cmd in self.commands.items()}

    def env_for(self, name: str) -> dict[str, str]:
        """The HTTP front talks only to the public API: it never holds the internal token."""
        return {k: v for k, v in self.env.items() if k != TOKEN_ENV["internal"]} if name == "http" else self.env

    def public_channel(self) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(self.address)
        folder, mutual = self.tls
        return open_channel(self.address, str(folder / "ca.pem"), *(
            (str(folder / "client.pem"), str(folder / "client.key")) if mutual else ()))

    def restart(self, name: str) -> None:
        """Starts a service again with its original command (after it died or was killed)."""
        self.procs[name].wait()
        self.procs[name] = subprocess.Popen(self.commands[name], env=self.env_for(name))

    def wait_ready(self, timeout_s: float = 900.0, should_stop=lambda: False) -> None:
        deadline = time.monotonic() + timeout_s
        with self.public_channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and not should_stop():
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
                try:
                    # Ask for the router's own service: another server on the port must not pass for it.
                    if stub.Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE), timeout=1.0).status == \
                            health_pb2.HealthCheckResponse.SERVING and self._http_listening():
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        if should_stop():
            return
        raise TimeoutError(f"the cluster was not serving after {timeout_s:.0f}s")

    def _http_listening(self) -> bool:
        if not self.http_address:
            return True
        host, port = self.http_address.rsplit(":", 1)
        with socket.socket() as sock:
            return sock.connect_ex((host, int(port))) == 0

    def stop(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        order = ["router", *(name for name in self.procs if name != "router")]
        for group in (order[:1], order[1:]):
            for name in group:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            for name in group:
                try:
                    self.procs[name].wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.procs[name].kill()
                    self.procs[name].wait()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(args: argparse.Namespace) -> int:
    cluster = Cluster(ClusterConfig.from_args(args))
    stop_requested = False

    def on_signal(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.wait_ready(should_stop=lambda: stop_requested)
        print(f"minedraft serving on {cluster.address} (mode {args.mode})", flush=True)
        supervisor = Supervisor(cluster)
        while not stop_requested:
            supervisor.check()
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0
