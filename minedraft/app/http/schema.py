"""The OpenAI request bodies the front takes, and how each becomes a GenerateRequest.

Besides OpenAI's own fields it takes the extensions vLLM's server made common (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids). Fields it cannot honour (echo, best_of,
logit_bias, tools, batched prompts…) are refused with a 400 that names them, never silently ignored: a dropped
control would make the output differ from what the client asked for."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from minedraft.app.client import make_request
from minedraft.protos import generate_pb2

MAX_N = 16  # the router's limit (validation.MAX_N)
MAX_TOP_LOGPROBS = 20
INT32 = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32)]


class Unsupported(ValueError):
    """A field this server does not implement: 400 with its name."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"`{param}` {reason}")
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked below, to name them in the error

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=INT32)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    user: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    # vLLM's extensions
    top_k: int = Field(default=0, ge=-1, le=INT32)  # -1 or 0: off
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, ge=0.1, le=10)
    min_tokens: int = Field(default=0, ge=0, le=INT32)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=64)

    def check_supported(self) -> None:
        extra = sorted(self.model_extra or {})
        if extra:
            raise Unsupported(extra[0], "is not a field this server supports")

    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def request(self, prompt: str | None = None, messages: list[dict] | None = None,
                prompt_ids: list[int] | None = None) -> generate_pb2.GenerateRequest:
        return make_request(
            prompt=prompt, messages=messages, prompt_ids=prompt_ids, stop=self.stops(), n=self.n,
            max_tokens=self.max_completion_tokens or self.max_tokens, ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), seed=self.seed, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            min_tokens=self.min_tokens, logprobs=self.top_logprobs_wanted())


class CompletionRequest(Sampled):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise Unsupported("echo", "is not supported")
        if isinstance(self.prompt, list) and len(self.prompt) > 1 and not isinstance(self.prompt[0], int):
            raise Unsupported("prompt", "takes one prompt per request (send a list as separate requests)")

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def to_grpc(self) -> generate_pb2.GenerateRequest:
        prompt = self.prompt[0] if isinstance(self.prompt, list) and len(self.prompt) == 1 and \
            not isinstance(self.prompt[0], int) else self.prompt
        if isinstance(prompt, list):
            return self.request(prompt_ids=prompt)
        return self.request(prompt=prompt)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "needs `logprobs: true`")

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def to_grpc(self) -> generate_pb2.GenerateRequest:
        return self.request(messages=[m.model_dump() for m in self.messages])
