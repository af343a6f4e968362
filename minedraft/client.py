"""A small client of the public API, used by `minedraft generate`, the demo and the tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from google.protobuf.json_format import MessageToDict

from minedraft.protos import common_pb2, generate_pb2, generate_pb2_grpc


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


def stream(channel: grpc.Channel, request: generate_pb2.GenerateRequest, timeout: float | None = None
           ) -> Iterator[generate_pb2.GenerateResponse]:
    """The server stream: iterate it for responses; `.cancel()` ends it early."""
    return generate_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout)


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
