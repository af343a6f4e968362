"""The `minedraft` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders, never from a hub at run time


def _run_async(serve) -> int:
    asyncio.run(serve)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from minedraft.app.client import Generation, absorb, api_key_metadata, make_request, open_channel, stream

    messages = None
    if args.chat or args.system:  # the prompt is the user's turn of a chat, in the model's chat template
        messages = [*([{"role": "system", "content": args.system}] if args.system else []),
                    {"role": "user", "content": args.prompt}]
    request = make_request(
        prompt=None if messages else args.prompt, messages=messages, max_tokens=args.max_tokens, stop=args.stop,
        speculation=args.speculation, n=args.n, ignore_eos=args.ignore_eos, stop_token_ids=args.stop_token_id,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, min_tokens=args.min_tokens, logprobs=args.logprobs)
    results: dict[int, Generation] = {}
    with open_channel(args.addr, args.tls_ca, args.tls_cert, args.tls_key) as channel:
        try:
            for response in stream(channel, request, timeout=args.timeout,
                                   metadata=api_key_metadata(args.api_key_file)):
                index = response.chunk.index if response.HasField("chunk") else response.final.index
                absorb(results.setdefault(index, Generation()), response)
                if response.HasField("chunk") and not args.json and args.n == 1:  # n > 1: printed whole below
                    print(response.chunk.text, end="", flush=True)
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    samples = [results[i] for i in sorted(results)]
    if args.json:
        print(json.dumps(samples[0].as_json() if args.n == 1 else {"samples": [r.as_json() for r in samples]}))
        return 0
    for index, result in enumerate(samples):
        if args.n > 1:
            print(f"--- sample {index}\n{result.text}")
        for entry in result.logprobs:
            tops = zip(entry.get("top_ids", []), entry.get("top_logprobs", []), strict=True)
            alternatives = ", ".join(f"{t}:{float(v):.3f}" for t, v in tops)  # -inf arrives as "-Infinity"
            print(f"{entry.get('token_id', 0)}\t{float(entry.get('logprob', 0.0)):.4f}\t{alternatives}",
                  file=sys.stderr)
        stats = result.stats
        drafted = int(stats.get("drafted_tokens", 0))
        alpha = int(stats.get("accepted_tokens", 0)) / drafted if drafted else 0.0
        print(f"\n[{result.finish_reason}] {stats.get('completion_tokens')} tokens in "
              f"{float(stats.get('total_s', 0)):.2f}s, alpha {alpha:.2f}", file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service at ADDR says SERVING (for container healthchecks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from minedraft.app.client import open_channel

    with open_channel(args.addr, args.tls_ca, args.tls_cert, args.tls_key) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{args.addr}: {error.code().name}", file=sys.stderr)
            return 1
    print(f"{args.addr}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from minedraft.models.tiny import build_tiny_pair

    target, draft = build_tiny_pair(args.out, noise=args.noise)
    print(f"target: {target}\ndraft: {draft}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from minedraft.models.registry import DEFAULT_PAIR
    from minedraft.models.store import fetch_human_eval, fetch_models

    for role, folder in zip(DEFAULT_PAIR, fetch_models(list(DEFAULT_PAIR.values())), strict=True):
        print(f"{role}: {folder}", flush=True)
    print(f"prompts: {fetch_human_eval()}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minedraft.app.certs import write_certs

    for role, path in write_certs(Path(args.out)).items():
        print(f"{role}: {path}")
    return 0


def cmd_http(args: argparse.Namespace) -> int:
    import uvicorn

    from minedraft.app.http.front import create_app

    app = create_app(args.router, args.model_name, args.tls_ca, args.tls_cert, args.tls_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


LIGHT_COMMANDS = ("generate", "health", "certs", "http")  # parsed without importing torch: a healthcheck takes < 1 s


def build_parser(light_only: bool = False) -> argparse.ArgumentParser:
    from minedraft.app.client import add_connection_args

    parser = argparse.ArgumentParser(prog="minedraft", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("MINEDRAFT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a generation from a running router")
    gen.add_argument("prompt")
    gen.add_argument("--addr", default="127.0.0.1:50051")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--stop-token-id", type=int, action="append", default=[], help="end at this token id")
    gen.add_argument("--n", type=int, default=1, help="samples of the prompt (printed one after another)")
    gen.add_argument("--logprobs", type=int, default=None, metavar="TOP",
                     help="print each token's log-probability and its TOP alternatives (0: none)")
    gen.add_argument("--min-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--frequency-penalty", type=float, default=None)
    gen.add_argument("--presence-penalty", type=float, default=None)
    gen.add_argument("--min-tokens", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="go on past EOS until --max-tokens")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.add_argument("--chat", action="store_true", help="send the prompt as the user's message of a chat")
    gen.add_argument("--system", default=None, help="a system message (implies --chat)")
    gen.add_argument("--speculation", default="", choices=["", "auto", "off"],
                     help="off: decode this request with the target alone (same output, no drafts)")
    add_connection_args(gen)
    gen.set_defaults(func=cmd_generate)

    health = sub.add_parser("health", help="check a service's gRPC health (exit 0 when SERVING)")
    health.add_argument("addr")
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=3.0)
    add_connection_args(health)
    health.set_defaults(func=cmd_health)

    certs = sub.add_parser("certs", help="make a private CA with server and client certificates (TLS, mTLS)")
    certs.add_argument("out", help="folder to write ca.pem, server.pem/.key and client.pem/.key to")
    certs.set_defaults(func=cmd_certs)
    http = sub.add_parser("http", help="serve the OpenAI HTTP API in front of a router")
    http.add_argument("--router", default="127.0.0.1:50051", help="the router's gRPC address")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--model-name", default="minedraft", help="the model id clients ask for (GET /v1/models)")
    add_connection_args(http)
    http.set_defaults(func=cmd_http)
    if not light_only:
        add_service_commands(sub)
    return parser


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    from minedraft.app import demo, launcher
    from minedraft.app.bench import cli as bench_cli
    from minedraft.app.bench import quality as bench_quality
    from minedraft.app.bench import steps as bench_steps
    from services.draft import main as draft_main
    from services.router import main as router_main
    from services.target import main as target_main

    serve = sub.add_parser("serve", help="start draft, target and router on loopback")
    launcher.add_args(serve)
    serve.set_defaults(func=launcher.serve)

    for name, module in (("draft", draft_main), ("target", target_main), ("router", router_main)):
        p = sub.add_parser(name, help=f"start the {name} service alone")
        module.add_args(p)
        p.set_defaults(func=lambda a, m=module: _run_async(m.serve(a)))

    models = sub.add_parser("models", help="prepare models").add_subparsers(dest="models_command", required=True)
    tiny = models.add_parser("tiny", help="write a tiny random-weight draft/target pair")
    tiny.add_argument("--out", default="models/tiny")
    tiny.add_argument("--noise", type=float, default=0.05)
    tiny.set_defaults(func=cmd_models_tiny)
    fetch = models.add_parser("fetch", help="fetch, verify and convert the embedded default pair (idempotent)")
    fetch.set_defaults(func=cmd_models_fetch)

    bench_parser = sub.add_parser("bench", help="measure ar, sd and psd side by side")
    bench_cli.add_args(bench_parser)
    bench_parser.set_defaults(func=bench_cli.run)
    steps_parser = sub.add_parser("bench-steps", help="one model step's time against its bandwidth floor")
    bench_steps.add_args(steps_parser)
    steps_parser.set_defaults(func=bench_steps.run)

    quality_parser = sub.add_parser("bench-quality", help="top-1 agreement of each numeric format with float32")
    bench_quality.add_args(quality_parser)
    quality_parser.set_defaults(func=bench_quality.run)

    demo_parser = sub.add_parser("demo", help="stream one answer through a cluster (auto) on the default pair")
    demo.add_args(demo_parser)
    demo_parser.set_defaults(func=demo.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(light_only=bool(argv) and argv[0] in LIGHT_COMMANDS).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
