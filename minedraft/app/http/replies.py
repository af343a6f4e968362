"""OpenAI response bodies built from the router's stream: whole replies and streamed chunks."""

from __future__ import annotations

import json

from minedraft.protos import generate_pb2

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class Reply:
    """One completion (or chat completion) as it streams in."""

    def __init__(self, chat: bool, reply_id: str, model: str, created: int) -> None:
        self.chat, self.id, self.model, self.created = chat, reply_id, model, created
        self.text = ""
        self.finish_reason: str | None = None
        self.stats = generate_pb2.RequestStats()
        self.started = False

    def absorb(self, response: generate_pb2.GenerateResponse) -> str:
        """Takes one response; returns its new text."""
        if response.HasField("final"):
            self.finish_reason = FINISH.get(response.final.finish_reason, response.final.finish_reason)
            self.stats = response.final.stats
            return ""
        self.text += response.chunk.text
        return response.chunk.text

    def usage(self) -> dict:
        prompt, completion = self.stats.prompt_tokens, self.stats.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                      "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage()}

    def chunk(self, response: generate_pb2.GenerateResponse) -> dict:
        text = self.absorb(response)
        finish = self.finish_reason if response.HasField("final") else None
        if self.chat:
            delta = {"content": text} if text or not finish else {}
            if not self.started:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        self.started = True
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}
