"""A logprob's `bytes` are the token's own bytes: a piece of a multi-byte character decodes alone to U+FFFD, but
the pieces' bytes joined make the character (as OpenAI's API gives them)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from minedraft.models.tiny import build_tokenizer
from services.router.text_stream import TextStream

TEXT = "naïve 🙂 日本 ok"


@pytest.mark.parametrize("wrapped", [False, True])
def test_byte_level_pieces_join_to_the_text_bytes(wrapped: bool) -> None:
    tokenizer = build_tokenizer()
    if wrapped:  # some tokenizers put ByteLevel inside a Sequence of decoders
        tokenizer.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel()])
        assert tokenizer.decode(tokenizer.encode(TEXT, add_special_tokens=False)) == TEXT
    stream = TextStream(tokenizer, [])
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(stream.token_text(i) == "\ufffd" for i in ids)  # decoded alone, a piece loses its bytes
    assert b"".join(stream.token_bytes(i) for i in ids) == TEXT.encode()
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stream.token_bytes(special) == b"<|im_end|>"
    assert stream.token_bytes(len(tokenizer)) == b""  # a padded head row past the vocabulary: no bytes, as no text


def test_sentencepiece_byte_fallback_and_word_marker() -> None:
    vocab = {"<unk>": 0, "\u2581": 1, "h": 2, "\u2581h": 3, "i": 4, **{f"<0x{b:02X}>": 5 + b for b in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "h")], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    stream = TextStream(tokenizer, [])
    ids = tokenizer.encode("hi é", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["\u2581h", "i", "\u2581", "<0xC3>", "<0xA9>"]
    assert [stream.token_bytes(i) for i in ids] == [b" h", b"i", b" ", b"\xc3", b"\xa9"]


class Joiner:
    """A decoder written in Python (tokenizers' Decoder.custom), which cannot be serialised."""

    def decode_chain(self, tokens: list[str]) -> list[str]:
        return ["".join(tokens)]


def test_a_custom_decoder_falls_back_to_the_text() -> None:
    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Decoder.custom(Joiner())
    stream = TextStream(tokenizer, [])
    token = tokenizer.encode("ok", add_special_tokens=False)[0]
    assert stream.token_bytes(token) == stream.token_text(token).encode()
