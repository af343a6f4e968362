"""Checks on a public request, each failing with a message that says what to change (INVALID_ARGUMENT)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from minedraft.engine.sampling import MIN_TEMPERATURE, Sampling
from minedraft.engine.sequence_table import check_sampling
from minedraft.errors import InvalidArgument
from minedraft.protos import common_pb2, generate_pb2

MAX_PROMPT_CHARS = 1_000_000
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256
MAX_TEMPERATURE = 100.0
MAX_SEED = (1 << 63) - 1
CHAT_ROLES = frozenset({"system", "user", "assistant"})
SPECULATION = frozenset({"", "auto", "off"})
MAX_N = 16
MAX_STOP_TOKEN_IDS = 64


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
    prompt_ids: list[int] | None  # checked against the vocabulary by the servicer
    sampling: Sampling  # its seed is the router's to pick when `seed` is None
    seed: int | None
    stops: list[str]
    stop_token_ids: frozenset[int]
    speculate: bool
    n: int
    ignore_eos: bool


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
    prompt_ids = list(request.prompt_ids.ids) if which == "prompt_ids" else None
    if prompt_ids is not None and not prompt_ids:
        raise InvalidArgument("prompt_ids holds no token ids")
    if prompt is not None and not prompt.strip():
        raise InvalidArgument("the prompt is empty")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are taken")
    sampling = _check_sampling(request.sampling)
    seed = request.sampling.seed if request.sampling.HasField("seed") else None
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
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"{len(request.stop_token_ids)} stop_token_ids; at most {MAX_STOP_TOKEN_IDS}")
    if request.speculation not in SPECULATION:
        raise InvalidArgument(f"speculation must be one of {sorted(SPECULATION)}, not {request.speculation!r}")
    if request.HasField("max_tokens") and request.max_tokens == 0:
        raise InvalidArgument("max_tokens must be at least 1")
    if request.HasField("max_tokens") and sampling.min_tokens > request.max_tokens:
        raise InvalidArgument("min_tokens must be at most max_tokens")
    if request.n > MAX_N:
        raise InvalidArgument(f"n must be in [1, {MAX_N}]")
    return Checked(chat=chat, prompt=prompt, prompt_ids=prompt_ids, sampling=sampling, seed=seed, stops=stops,
                   stop_token_ids=frozenset(request.stop_token_ids), speculate=request.speculation != "off",
                   n=max(1, request.n), ignore_eos=request.ignore_eos)


def _check_sampling(sampling: common_pb2.SamplingParams) -> Sampling:
    """The request's sampling settings (seed 0: set by the servicer), each checked."""
    temperature = sampling.temperature
    if not math.isfinite(temperature) or temperature < 0 or temperature > MAX_TEMPERATURE or \
            0 < temperature < MIN_TEMPERATURE:
        raise InvalidArgument(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    # Every other bound is the services' own (sequence_table.check_sampling): one set of checks, one wording.
    checked = Sampling.from_proto(sampling)
    check_sampling(checked)
    return replace(checked, seed=0, held_tokens=(), prompt_len=0)  # the router sets these itself


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
