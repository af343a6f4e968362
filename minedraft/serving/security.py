"""Who may call what: TLS (optionally mutual) on every server and the router's client channels, a bearer token
that only routers hold for the internal services, an optional API key on the public API, and an admin key for
the monitor's `clear`.

Health checks stay open (probes and compose healthchecks use them; they reveal nothing). Everything else on a
service that has a token configured answers UNAUTHENTICATED without it. Secrets come from files (compose
secrets, Kubernetes secret volumes) or environment variables, never from the command line, where `ps` shows
them."""

from __future__ import annotations

import argparse
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
TOKEN_ENV = {"internal": "MINEDRAFT_INTERNAL_TOKEN", "api": "MINEDRAFT_API_KEY", "admin": "MINEDRAFT_ADMIN_KEY"}


def add_server_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS instead of plaintext")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=None,
                        help="PEM CA: require a client certificate it signed (mutual TLS)")


def add_backend_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend-ca", default=None, help="PEM CA that signed the draft's and target's "
                        "certificates: reach them over TLS")
    parser.add_argument("--backend-cert", default=None, help="PEM client certificate for mutual TLS to them")
    parser.add_argument("--backend-key", default=None, help="PEM private key of --backend-cert")


TOKEN_FLAGS = {"internal": "--internal-token-file", "api": "--api-key-file", "admin": "--admin-key-file"}


def add_token_args(parser: argparse.ArgumentParser, *kinds: str) -> None:
    helps = {"internal": "the token routers present to draft and target (only its holders may call them)",
             "api": "an API key clients must present on the public API",
             "admin": "the key that may clear the router's monitor counters"}
    for kind in kinds:
        parser.add_argument(TOKEN_FLAGS[kind], default=None,
                            help=f"file holding {helps[kind]} (or set {TOKEN_ENV[kind]})")


def read_token(args: argparse.Namespace, kind: str) -> str | None:
    path = getattr(args, TOKEN_FLAGS[kind].lstrip("-").replace("-", "_"), None)
    token = Path(path).read_text().strip() if path else os.environ.get(TOKEN_ENV[kind], "").strip()
    if path and not token:  # an empty secret must not quietly turn the check off
        raise SystemExit(f"{TOKEN_FLAGS[kind]} {path} is empty")
    return token or None


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if not args.tls_cert:
        if args.tls_key or args.tls_client_ca:
            raise SystemExit("--tls-key and --tls-client-ca need --tls-cert")
        return None
    client_ca = _read(args.tls_client_ca)
    return grpc.ssl_server_credentials([(_read(args.tls_key), _read(args.tls_cert))], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca: str, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """TLS for a client channel: the server's CA, and for mutual TLS a client certificate and its key."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                        certificate_chain=_read(cert))


def backend_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not args.backend_ca:
        if args.backend_cert or args.backend_key:  # else the token would travel in plaintext
            raise SystemExit("--backend-cert and --backend-key need --backend-ca")
        return None
    return channel_credentials(args.backend_ca, args.backend_cert, args.backend_key)


def bearer(token: str) -> tuple[str, str]:
    return "authorization", f"Bearer {token}"


def metadata_value(metadata, key: str) -> str:
    """The value of `key` in a call's metadata ("" when absent)."""
    return next((value for k, value in metadata or () if k == key), "")


def bearer_token(metadata) -> str:
    value = metadata_value(metadata, "authorization")
    return value[len("Bearer "):] if value.startswith("Bearer ") else ""


def presented_token(context: grpc.aio.ServicerContext) -> str:
    return bearer_token(context.invocation_metadata())


def token_matches(presented: str, tokens: list[str]) -> bool:
    return any(hmac.compare_digest(presented.encode(), token.encode()) for token in tokens)


@dataclass
class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless it carries one of `tokens` as a bearer token."""

    tokens: list[str]

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        presented = bearer_token(details.invocation_metadata)
        if presented and token_matches(presented, self.tokens):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def refuse_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await refuse(request_or_iterator, context)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(refuse_stream if handler.response_streaming else refuse,
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
