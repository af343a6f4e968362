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
    logprobs: list[dict] = field(default_factory=list)  # per token, when asked for

    def as_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats, **({"logprobs": self.logprobs} if self.logprobs else {})}


def make_request(prompt: str | None = None, messages: list[dict] | None = None, max_tokens: int | None = None,
                 *, prompt_ids: list[int] | None = None, stop: list[str] | None = None, speculation: str = "",
                 n: int = 1, ignore_eos: bool = False, stop_token_ids: list[int] | None = None,
                 **sampling: float | int | None) -> generate_pb2.GenerateRequest:
    """`sampling`: SamplingParams fields (temperature, top_p, top_k, seed, min_p, the penalties, min_tokens,
    logprobs); None leaves one unset."""
    params = common_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    request = generate_pb2.GenerateRequest(sampling=params, stop=stop or [], speculation=speculation, n=n,
                                           ignore_eos=ignore_eos, stop_token_ids=stop_token_ids or [])
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if messages is not None:
        request.chat.CopyFrom(generate_pb2.Chat(messages=[generate_pb2.ChatMessage(**m) for m in messages]))
    elif prompt_ids is not None:
        request.prompt_ids.SetInParent()  # set even when empty (the server says what is wrong)
        request.prompt_ids.ids[:] = prompt_ids
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
    """Folds a response stream (sync iterator) into one Generation (the first sample's, with n > 1)."""
    return collect_all(responses)[0]


def collect_all(responses) -> list[Generation]:
    """Folds a response stream into one Generation per sample, by index."""
    results: dict[int, Generation] = {}
    for response in responses:
        index = response.chunk.index if response.HasField("chunk") else response.final.index
        absorb(results.setdefault(index, Generation()), response)
    return [results[i] for i in sorted(results)] or [Generation()]


def absorb(result: Generation, response: generate_pb2.GenerateResponse) -> None:
    if response.HasField("chunk"):
        result.text += response.chunk.text
        result.token_ids.extend(response.chunk.token_ids)
        result.logprobs.extend(MessageToDict(lp, preserving_proto_field_name=True) for lp in response.chunk.logprobs)
    else:
        result.finish_reason = response.final.finish_reason
        result.stats = MessageToDict(response.final.stats, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
