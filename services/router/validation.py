"""Checks on a public request, each failing with a message that says what to change (INVALID_ARGUMENT)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from minedraft.engine.sampling import MIN_TEMPERATURE
from minedraft.errors import InvalidArgument
from minedraft.protos import generate_pb2

MAX_PROMPT_CHARS = 1_000_000
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256
MAX_TEMPERATURE = 100.0
MAX_SEED = (1 << 63) - 1
CHAT_ROLES = frozenset({"system", "user", "assistant"})
SPECULATION = frozenset({"", "auto", "off"})


class Malformed:
    """What the request deserializer hands over when the bytes are not a valid GenerateRequest."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_request(data: bytes) -> generate_pb2.GenerateRequest | Malformed:
    """Never raises, so that bad bytes (say, invalid UTF-8 in a string) get INVALID_ARGUMENT, not INTERNAL."""
    try:
        return generate_pb2.GenerateRequest.FromString(data)
    except DecodeError as error:
        return Malformed(f"the request is not a valid GenerateRequest ({error}); strings must be UTF-8")


@dataclass(frozen=True)
class Checked:
    chat: list[dict] | None
    prompt: str | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stops: list[str]
    speculate: bool


def check_request(request: generate_pb2.GenerateRequest | Malformed) -> Checked:
    if isinstance(request, Malformed):
        raise InvalidArgument(request.reason)
    if len(UnknownFieldSet(request)) or len(UnknownFieldSet(request.sampling)):
        raise InvalidArgument("the request has fields this server does not know; upgrade the server or drop them")
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgument("give a prompt or chat messages")
    chat = _check_chat(request.chat) if which == "chat" else None
    prompt = request.prompt if which == "prompt" else None
    if prompt is not None and not prompt.strip():
        raise InvalidArgument("the prompt is empty")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are taken")
    sampling = request.sampling
    temperature = sampling.temperature
    if not math.isfinite(temperature) or temperature < 0 or temperature > MAX_TEMPERATURE or \
            0 < temperature < MIN_TEMPERATURE:
        raise InvalidArgument(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]")
    if sampling.top_k < 0:
        raise InvalidArgument("top_k must be 0 (off) or positive")
    seed = sampling.seed if sampling.HasField("seed") else None
    if seed is not None and seed > MAX_SEED:
        raise InvalidArgument(f"seed must be at most 2^63-1 = {MAX_SEED}")
    stops = list(request.stop)
    if len(stops) > MAX_STOPS:
        raise InvalidArgument(f"{len(stops)} stop strings; at most {MAX_STOPS}")
    for stop in stops:
        if not stop:
            raise InvalidArgument("a stop string is empty")
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidArgument(f"a stop string has {len(stop)} characters; at most {MAX_STOP_CHARS}")
    if request.speculation not in SPECULATION:
        raise InvalidArgument(f"speculation must be one of {sorted(SPECULATION)}, not {request.speculation!r}")
    if request.HasField("max_tokens") and request.max_tokens == 0:
        raise InvalidArgument("max_tokens must be at least 1")
    return Checked(chat=chat, prompt=prompt, temperature=temperature, top_p=top_p, top_k=sampling.top_k,
                   seed=seed, stops=stops, speculate=request.speculation != "off")


def _check_chat(chat: generate_pb2.Chat) -> list[dict]:
    if not chat.messages:
        raise InvalidArgument("the chat has no messages")
    if len(chat.messages) > MAX_MESSAGES:
        raise InvalidArgument(f"the chat has {len(chat.messages)} messages; at most {MAX_MESSAGES}")
    total = sum(len(m.content) for m in chat.messages)
    if total > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"the chat has {total} characters; at most {MAX_PROMPT_CHARS} are taken")
    for i, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(f"message {i}: unknown role {message.role!r}; use one of {sorted(CHAT_ROLES)}")
        if not message.content.strip():
            raise InvalidArgument(f"message {i} ({message.role}) has no content")
    if chat.messages[-1].role == "assistant":
        raise InvalidArgument("the last message must not be the assistant's: there is nothing to answer")
    return [{"role": m.role, "content": m.content} for m in chat.messages]
