"""The OpenAI request bodies the front takes, and how each becomes a GenerateRequest.

Fields the router cannot honour yet (logprobs, n > 1, penalties, tools…) are refused with a 400 that names
them, never silently ignored: under speculation a silently dropped control would make the output differ from
what the client asked for."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from minedraft.app.client import make_request
from minedraft.protos import generate_pb2


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
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    # Accepted only at the values that change nothing.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None

    def check_supported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise Unsupported(name, "is not supported yet (it would change the output; refused, not ignored)")
        if self.logprobs:
            raise Unsupported("logprobs", "is not supported yet")
        extra = sorted(self.model_extra or {})
        if extra:
            raise Unsupported(extra[0], "is not a field this server supports")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def request(self, prompt: str | None = None, messages: list[dict] | None = None) -> generate_pb2.GenerateRequest:
        return make_request(prompt=prompt, messages=messages, max_tokens=self.max_completion_tokens or self.max_tokens,
                            temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stops())


class CompletionRequest(Sampled):
    prompt: str
    echo: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise Unsupported("echo", "is not supported yet")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)

    def chat(self) -> list[dict]:
        return [m.model_dump() for m in self.messages]
