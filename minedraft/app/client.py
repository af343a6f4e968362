"""A small client of the public API, used by `minedraft generate`, the demo and the tests."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from minedraft.protos import common_pb2, generate_pb2, generate_pb2_grpc
from minedraft.serving.security import bearer, channel_credentials


@dataclass
class Generation:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stats: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats}


def make_request(prompt: str | None = None, messages: list[dict] | None = None, max_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: list[str] | None = None, speculation: str = "") -> generate_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        sampling.seed = seed
    request = generate_pb2.GenerateRequest(sampling=sampling, stop=stop or [], speculation=speculation)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if messages is not None:
        request.chat.CopyFrom(generate_pb2.Chat(messages=[generate_pb2.ChatMessage(**m) for m in messages]))
    else:
        request.prompt = prompt or ""
    return request


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", default=None, help="PEM CA of the server's certificate: connect over TLS")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate (a mutual-TLS server)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--api-key-file", default=None, help="file holding the API key (or set MINEDRAFT_API_KEY)")


def open_channel(address: str, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> grpc.Channel:
    """A plaintext channel, or TLS when given the server's CA (and, for mutual TLS, a client certificate)."""
    if not tls_ca:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key))


def api_key_metadata(api_key_file: str | None = None) -> list[tuple[str, str]]:
    key = Path(api_key_file).read_text().strip() if api_key_file else os.environ.get("MINEDRAFT_API_KEY", "")
    return [bearer(key)] if key else []


def stream(channel: grpc.Channel, request: generate_pb2.GenerateRequest, timeout: float | None = None,
           metadata: list[tuple[str, str]] | None = None) -> Iterator[generate_pb2.GenerateResponse]:
    """The server stream: iterate it for responses; `.cancel()` ends it early."""
    return generate_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout, metadata=metadata)


def collect(responses) -> Generation:
    """Folds a response stream (sync iterator) into one Generation."""
    result = Generation()
    for response in responses:
        absorb(result, response)
    return result


def absorb(result: Generation, response: generate_pb2.GenerateResponse) -> None:
    if response.HasField("chunk"):
        result.text += response.chunk.text
        result.token_ids.extend(response.chunk.token_ids)
    else:
        result.finish_reason = response.final.finish_reason
        result.stats = MessageToDict(response.final.stats, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
