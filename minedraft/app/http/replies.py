"""OpenAI response bodies built from the router's stream: whole replies and streamed chunks, n choices each."""

from __future__ import annotations

import json

from minedraft.protos import common_pb2, generate_pb2

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
FLOOR = -9999.0  # stands in for -inf (a token outside top-k/top-p), which JSON cannot carry


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def finite(value: float) -> float:
    return value if value >= FLOOR else FLOOR  # -inf and NaN alike


def chat_logprobs(entries: list[common_pb2.TokenLogprob]) -> dict:
    def one(token: str, logprob: float, raw: bytes) -> dict:
        return {"token": token, "logprob": finite(logprob), "bytes": list(raw or token.encode())}
    return {"content": [{**one(e.token, e.logprob, e.token_bytes), "top_logprobs": [
        one(t, v, raw) for t, v, raw in zip(e.top_tokens, e.top_logprobs,
                                            e.top_token_bytes or [b""] * len(e.top_tokens), strict=True)]}
        for e in entries]}


def completion_logprobs(entries: list[common_pb2.TokenLogprob], offset: int) -> dict:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [finite(e.logprob) for e in entries],
            "top_logprobs": [{t: finite(v) for t, v in zip(e.top_tokens, e.top_logprobs, strict=True)}
                             for e in entries], "text_offset": offsets}


class Choice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.text = ""
        self.logprobs: list[common_pb2.TokenLogprob] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.started = False


class Reply:
    """One completion (or chat completion) of n choices as it streams in."""

    def __init__(self, chat: bool, reply_id: str, model: str, created: int, n: int = 1,
                 logprobs: bool = False) -> None:
        self.chat, self.id, self.model, self.created = chat, reply_id, model, created
        self.choices = [Choice(i) for i in range(n)]
        self.logprobs = logprobs
        self.prompt_tokens = 0

    def absorb(self, response: generate_pb2.GenerateResponse) -> Choice:
        """Takes one response; returns the choice it belongs to."""
        if response.HasField("final"):
            choice = self.choices[response.final.index]
            choice.finish_reason = FINISH.get(response.final.finish_reason, response.final.finish_reason)
            choice.completion_tokens = response.final.stats.completion_tokens
            self.prompt_tokens = response.final.stats.prompt_tokens
            return choice
        choice = self.choices[response.chunk.index]
        choice.text += response.chunk.text
        choice.logprobs.extend(response.chunk.logprobs)
        return choice

    def usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[common_pb2.TokenLogprob], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        return chat_logprobs(entries) if self.chat else completion_logprobs(entries, offset)

    def whole(self) -> dict:
        choices = []
        for c in self.choices:
            body = {"message": {"role": "assistant", "content": c.text}} if self.chat else {"text": c.text}
            choices.append({"index": c.index, **body, "logprobs": self._logprobs(c.logprobs, 0),
                            "finish_reason": c.finish_reason})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}

    def chunk(self, response: generate_pb2.GenerateResponse) -> dict:
        offset = len(self.choices[response.chunk.index].text) if response.HasField("chunk") else 0
        choice = self.absorb(response)
        text = response.chunk.text if response.HasField("chunk") else ""
        new_logprobs = list(response.chunk.logprobs) if response.HasField("chunk") else []
        finish = choice.finish_reason if response.HasField("final") else None
        logprobs = self._logprobs(new_logprobs, offset) if new_logprobs else None
        if self.chat:
            delta = {"content": text} if text or not finish else {}
            if not choice.started:
                delta = {"role": "assistant", **delta}
            body = {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            body = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        choice.started = True
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [body]}

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}
