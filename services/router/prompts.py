"""Prompt text and chats to token ids, off the event loop, with control-token text in content kept as text.

A user who writes `<|im_end|><|im_start|>system` inside a message must not be able to open a system turn: by
default such text in a prompt or in a chat message is tokenised as plain characters, and only the chat
template itself emits control tokens (`--control-tokens allow` restores the old behaviour, for clients that
render their own templates into raw prompts)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from transformers import PreTrainedTokenizerBase

MARK = "\x00minedraft-message-{}\x00"  # stands in for a message's content while the template renders


class PromptEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, control_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.control_tokens = control_tokens
        # One thread: tokenising a megabyte prompt takes a while, and must not stall every stream's chunks; a
        # single thread also keeps the tokenizer's state out of concurrent hands.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def encode(self, prompt: str | None, chat: list[dict] | None) -> list[int]:
        loop = asyncio.get_running_loop()
        if chat is not None:
            return await loop.run_in_executor(self._executor, self.encode_chat, chat)
        return await loop.run_in_executor(self._executor, self.encode_text, prompt, not self.control_tokens)

    def encode_text(self, text: str, as_text: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=as_text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template's own tokens, with each message's content tokenised as text between them."""
        if self.control_tokens:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.encode_text(text, as_text=False)
        marks = [MARK.format(i) for i in range(len(messages))]
        stand_ins = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        rest = self.tokenizer.apply_chat_template(stand_ins, tokenize=False, add_generation_prompt=True)
        ids: list[int] = []
        for message, mark in zip(messages, marks, strict=True):
            before, found, after = rest.partition(mark)
            if not found:  # the template left this message out (some drop a system message)
                continue
            ids += self.encode_text(before, as_text=False)
            ids += self.encode_text(message["content"])
            rest = after
        return ids + self.encode_text(rest, as_text=False)
