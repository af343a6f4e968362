"""Incremental detokenisation with stop strings: streams only text that is final.

Text is released once the tokenizer's decoding of it can no longer change (no dangling partial
UTF-8 sequence, merged tokens settled) and it cannot be the beginning of a stop string.
"""

from __future__ import annotations

import functools
import json
import re

from tokenizers import decoders
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's printable alphabet
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's piece for one raw byte


@functools.cache
def _vocabulary(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, frozenset[int]]:
    """(whether its pieces are byte-level BPE's alphabet, its added tokens' ids): read once per tokenizer, not per
    stream (the added tokens' property is rebuilt at every read)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return _is_byte_level(decoder), frozenset(tokenizer.added_tokens_decoder)


def _is_byte_level(decoder: object) -> bool:
    """Whether the decoder maps pieces through byte-level BPE's alphabet, alone or as a step of a Sequence
    (whose steps Python cannot list: read from the decoder's own JSON)."""
    if not isinstance(decoder, decoders.Decoder):
        return False
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # a custom (Python) decoder cannot be serialised, so it cannot be read either
        return isinstance(decoder, decoders.ByteLevel)
    return _names_byte_level(state)


def _names_byte_level(step: dict) -> bool:
    return step.get("type") == "ByteLevel" or any(_names_byte_level(inner) for inner in step.get("decoders", []))


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # decoded text that no later token can change
        self.sent = 0  # characters of self.text already streamed
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of self.text (the context of the next token)
        self._read = 0
        self._held_until = 0  # min_tokens: no stop string may end at or before this character
        self.stopped = False

    def token_text(self, token_id: int) -> str:
        """One token's text, decoded alone (special tokens included: a logprob names the token it is for)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes, as OpenAI's logprobs give them: from the vocabulary's piece (byte-level BPE's
        alphabet, SentencePiece's byte fallback and word marker), not from its text decoded alone."""
        byte_level, added = _vocabulary(self.tokenizer)
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str) or token_id in added:  # special: its text
            return self.token_text(token_id).encode()
        if byte_level and all(char in BYTE_OF_CHAR for char in piece):
            return bytes(BYTE_OF_CHAR[char] for char in piece)
        if raw := BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(raw[1], 16)])
        if piece.startswith("\u2581"):  # SentencePiece's word marker stands for a space
            return piece.replace("\u2581", " ").encode()
        return self.token_text(token_id).encode()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int, may_stop: bool = True) -> None:
        """Adds one generated token; afterwards check `stopped`. `may_stop` False (min_tokens not yet passed, as
        in vLLM): no stop string ends in the text up to here; one may still begin in it and end later."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        if not may_stop:
            self._held_until = len(self.text)
            return
        longest = max((len(s) for s in self.stops), default=0)
        window_start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, max(window_start, self._held_until - len(s) + 1)) for s in self.stops)
                if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        """Text ready to stream now. Holds back a tail that may still grow into a stop string, unless final."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._stop_prefix_len()
        if final and not self.stopped:  # flush what was waiting on more bytes
            self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._prefix = self._read = len(self.ids)
            end = len(self.text)
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
