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
from minedraft.app.forwarding import forward, offer
from minedraft.app.supervisor import Supervisor
from minedraft.engine.precision import CPU_DEFAULT_QUANT, DRAFT_ONLY_QUANTS, QUANTS, resolve_quant
from minedraft.engine.sequence_table import DEFAULT_LEASE_S
from minedraft.engine.static_kv import uses_static_kv
from minedraft.serving.model_service import add_kv_args
from minedraft.serving.security import TOKEN_ENV
from services.router.modes import MODES


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="auto", choices=MODES)
    parser.add_argument("--port", type=int, default=50051, help="the router's public port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--draft-model", default="default-draft", help="preset, .gguf file or model folder")
    parser.add_argument("--target-model", default="default-target", help="preset, .gguf file or model folder")
    parser.add_argument("--draft-port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--target-port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S,
                        help="the services drop sequences the router has not used or renewed for this long")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="Prometheus ports: router on this one, draft +1, target +2 (0: off)")
    parser.add_argument("--device", default="cpu", help="device of both models (see --draft-device)")
    parser.add_argument("--draft-device", default=None)
    parser.add_argument("--dtype", default="auto", help="both models (auto: bfloat16 where the device multiplies "
                        "it natively, else float32)")
    parser.add_argument("--draft-quant", default="auto", choices=["auto", *QUANTS],
                        help="CPU weight-only format of the draft (its precision moves acceptance, never output); "
                             f"auto: {CPU_DEFAULT_QUANT['draft']} on the CPU")
    target_quants = [q for q in QUANTS if q not in DRAFT_ONLY_QUANTS]
    parser.add_argument("--target-quant", default="auto", choices=["auto", *target_quants],
                        help=f"CPU weight-only format of the target; auto: {CPU_DEFAULT_QUANT['target']} on the CPU")
    parser.add_argument("--tokenizer", default=None, help="the router's tokenizer (default: the target model's)")
    parser.add_argument("--tls-dir", default=None, help="certificates from `minedraft certs DIR`: every service "
                        "serves TLS, and draft and target take only clients with a certificate from its CA")
    parser.add_argument("--public-mtls", action="store_true",
                        help="with --tls-dir: clients of the public API must present a certificate too")
    parser.add_argument("--api-key-file", default=None, help="the router's API key (see `minedraft router`)")
    parser.add_argument("--admin-key-file", default=None, help="the router's admin key (see `minedraft router`)")
    add_kv_args(parser)
    parser.set_defaults(max_seqs=0)
    parser.add_argument("--cpu-layout", default="auto", choices=CPU_LAYOUTS,
                        help="how draft and target use the CPU's cores: split (disjoint halves, one device each), "
                             "shared (all cores each; the router asks for half while both run), none (no pinning); "
                             "auto: the target alone gets every core in ar, split in psd, shared in sd and auto")
    parser.set_defaults(passthrough={name: offer(service_parser(name), parser, skip, prefix)
                                     for name, skip, prefix in (("router", ROUTER_OWNED, ""),
                                                                ("draft", MODEL_OWNED, "draft-"),
                                                                ("target", MODEL_OWNED, "target-"))})


# What the launcher decides for its children itself; every other option of theirs passes through (forwarding.py).
ROUTER_OWNED = {"host", "port", "mode", "target_addr", "draft_addr", "tokenizer", "draft_tokenizer", "max_context",
                "metrics_port", "share_cores", "tls_cert", "tls_key", "tls_client_ca", "backend_ca", "backend_cert",
                "backend_key", "internal_token_file", "api_key_file", "admin_key_file"}
MODEL_OWNED = {"model", "host", "port", "device", "dtype", "quant", "metrics_port", "cpu_cores", "kv", "max_seqs",
               "max_context", "kv_memory_fraction", "cuda_graphs", "lease_s", "tls_cert", "tls_key", "tls_client_ca",
               "internal_token_file"}


def service_parser(name: str) -> argparse.ArgumentParser:
    from services.draft import main as draft_main
    from services.router import main as router_main
    from services.target import main as target_main

    parser = argparse.ArgumentParser(add_help=False)
    {"router": router_main, "draft": draft_main, "target": target_main}[name].add_args(parser)
    return parser


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


CPU_LAYOUTS = ("auto", "split", "shared", "none")
SPARE_SLOTS = 2


def cpu_layout(args: argparse.Namespace) -> str:
    """The layout this cluster runs: `auto` resolved by mode (see --cpu-layout); none off the CPU."""
    if args.device != "cpu" or (args.draft_device or "cpu") != "cpu" or len(os.sched_getaffinity(0)) < 2:
        return "none"
    if args.cpu_layout != "auto":
        return args.cpu_layout
    return {"ar": "shared", "psd": "split"}.get(args.mode, "shared")


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


def commands(args: argparse.Namespace, draft_port: int, target_port: int) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "minedraft.cli"]
    max_seqs = args.max_seqs or 2 * args.max_batch + SPARE_SLOTS  # two full lanes, and room for a warm-up
    common = ["--dtype", args.dtype, "--host", "127.0.0.1", "--kv", args.kv, "--max-seqs", str(max_seqs),
              "--lease-s", str(args.lease_s),
              "--max-context", str(args.max_context), "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs"]
    same_gpu = args.device.startswith("cuda") and (args.draft_device or args.device) == args.device
    fraction = args.kv_memory_fraction or (0.45 if same_gpu else None)  # two caches on one GPU: half each
    if fraction:
        common += ["--kv-memory-fraction", str(fraction)]
    draft_cores, target_cores, router_cores = core_args(cpu_layout(args))
    draft_device = args.draft_device or args.device
    passthrough = args.passthrough
    draft = [*cli, "draft", "--model", args.draft_model, "--port", str(draft_port), "--device", draft_device,
             "--quant", resolve_quant(args.draft_quant, "draft", draft_device), *common, *draft_cores,
             *forward(args, passthrough["draft"])]
    target = [*cli, "target", "--model", args.target_model, "--port", str(target_port), "--device", args.device,
              "--quant", resolve_quant(args.target_quant, "target", args.device), *common, *target_cores,
              *forward(args, passthrough["target"])]
    router = [*cli, "router", "--mode", args.mode, "--port", str(args.port), "--host", args.host,
              "--target-addr", f"127.0.0.1:{target_port}", "--draft-addr", f"127.0.0.1:{draft_port}",
              "--tokenizer", args.tokenizer or args.target_model,
              "--draft-tokenizer", args.tokenizer or args.draft_model, *router_cores,
              *forward(args, passthrough["router"])]
    if any(uses_static_kv(args.kv, device) for device in (args.device, args.draft_device or args.device)):
        router += ["--max-context", str(args.max_context)]  # the services' static caches hold no more
    if args.tls_dir:
        tls = Path(args.tls_dir)
        for cmd in (draft, target):
            cmd += ["--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key"),
                    "--tls-client-ca", str(tls / "ca.pem")]
        router += ["--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key"),
                   "--backend-ca", str(tls / "ca.pem"), "--backend-cert", str(tls / "client.pem"),
                   "--backend-key", str(tls / "client.key"),
                   *(["--tls-client-ca", str(tls / "ca.pem")] if args.public_mtls else [])]
    for flag, path in (("--api-key-file", args.api_key_file), ("--admin-key-file", args.admin_key_file)):
        router += [flag, str(path)] if path else []
    if args.metrics_port:
        for offset, cmd in enumerate((router, draft, target)):
            cmd += ["--metrics-port", str(args.metrics_port + offset)]
    procs = {"target": target, "router": router}
    if args.mode != "ar":
        procs = {"draft": draft, **procs}
    return procs


class Cluster:
    """The three processes. stop() drains the router first (its streams finish), then the model services."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.address = f"{args.host}:{args.port}"
        spare = iter(free_ports(2, exclude=(args.port,)))
        self.draft_address = f"127.0.0.1:{args.draft_port or next(spare)}"
        self.target_address = f"127.0.0.1:{args.target_port or next(spare)}"
        self.commands = commands(args, int(self.draft_address.rsplit(":", 1)[1]),
                                 int(self.target_address.rsplit(":", 1)[1]))
        # Only this cluster's router may call its draft and target: a token made for it, handed over in the
        # environment (never argv, which `ps` shows).
        self.internal_token = secrets.token_urlsafe(24)
        self.env = {**os.environ, TOKEN_ENV["internal"]: self.internal_token}
        self.tls = (Path(args.tls_dir), args.public_mtls) if args.tls_dir else None
        self.procs = {name: subprocess.Popen(cmd, env=self.env) for name, cmd in self.commands.items()}

    def public_channel(self) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(self.address)
        folder, mutual = self.tls
        return open_channel(self.address, str(folder / "ca.pem"), *(
            (str(folder / "client.pem"), str(folder / "client.key")) if mutual else ()))

    def restart(self, name: str) -> None:
        """Starts a service again with its original command (after it died or was killed)."""
        self.procs[name].wait()
        self.procs[name] = subprocess.Popen(self.commands[name], env=self.env)

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
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        if should_stop():
            return
        raise TimeoutError(f"the cluster was not serving after {timeout_s:.0f}s")

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
    cluster = Cluster(args)
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
