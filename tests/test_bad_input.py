"""Every kind of bad request gets INVALID_ARGUMENT with a clear message, and the server keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest

from minedraft.app.client import collect, make_request, stream
from minedraft.protos import common_pb2, generate_pb2
from tests.conftest import channel_to


def request(**fields) -> generate_pb2.GenerateRequest:
    base = {"prompt": "Hello", "max_tokens": 4}
    base.update(fields)
    return make_request(**base)


def with_sampling(**sampling) -> generate_pb2.GenerateRequest:
    message = request()
    message.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return message


def chat(*messages) -> generate_pb2.GenerateRequest:
    return make_request(messages=[{"role": r, "content": c} for r, c in messages], max_tokens=4)


def no_input() -> generate_pb2.GenerateRequest:
    message = request()
    message.ClearField("prompt")
    return message


def raw(message: generate_pb2.GenerateRequest, extra: bytes) -> bytes:
    return message.SerializeToString() + extra


BAD_REQUESTS = {
    "empty prompt": request(prompt=""),
    "blank prompt": request(prompt="   \n"),
    "no prompt nor chat": no_input(),
    "prompt over the context": request(prompt="word " * 3000),
    "prompt of too many characters": request(prompt="x" * 1_000_001),
    "max_tokens zero": request(max_tokens=0),
    "max_tokens past the context": request(max_tokens=100_000),
    "negative temperature": request(temperature=-0.5),
    "NaN temperature": request(temperature=math.nan),
    "infinite temperature": request(temperature=math.inf),
    "absurd temperature": request(temperature=1e6),
    "top_p zero": request(top_p=0.0),
    "top_p above one": request(top_p=1.5),
    "NaN top_p": request(top_p=math.nan),
    "negative top_k": request(top_k=-3),
    "absurd seed": with_sampling(seed=(1 << 64) - 1),
    "too many stop strings": request(stop=[f"s{i}" for i in range(17)]),
    "too long stop string": request(stop=["x" * 300]),
    "empty stop string": request(stop=["ok", ""]),
    "unknown chat role": chat(("wizard", "hi")),
    "empty chat message": chat(("user", "")),
    "chat ending with the assistant": chat(("user", "hi"), ("assistant", "hello")),
    "chat without messages": make_request(messages=[], max_tokens=4),
    "unknown speculation mode": request(speculation="turbo"),
    "invalid UTF-8": b"\x0a\x02\xff\xfe",
    "unknown field": raw(request(), b"\x98\x06\x01"),  # field 99, varint 1
    "not protobuf at all": b"\xff\xff\xff\xff",
}


def call_raw(channel: grpc.Channel, payload: bytes | generate_pb2.GenerateRequest) -> list:
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    method = channel.unary_stream("/minedraft.protos.Generation/Generate", request_serializer=lambda b: b,
                                  response_deserializer=generate_pb2.GenerateResponse.FromString)
    return list(method(data, timeout=30))


def test_at_least_twenty_kinds_are_covered() -> None:
    assert len(BAD_REQUESTS) >= 20


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument(tiny_clusters, name: str) -> None:
    with channel_to(tiny_clusters["psd"]) as channel:
        with pytest.raises(grpc.RpcError) as error:
            call_raw(channel, BAD_REQUESTS[name])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert error.value.details()
        good = collect(stream(channel, request(max_tokens=3)))  # the server is still serving
        assert good.finish_reason in ("length", "eos")


def test_oversized_message_is_resource_exhausted(tiny_clusters) -> None:
    with channel_to(tiny_clusters["psd"]) as channel:
        with pytest.raises(grpc.RpcError) as error:
            call_raw(channel, request(prompt="y" * (9 * 1024 * 1024)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
