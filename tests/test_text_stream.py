"""Streamed text must equal decoding everything at once, and never run past a stop string."""

import pytest
from transformers import AutoTokenizer

from minedraft.models.store import PRESETS, cache_dir
from minedraft.models.tiny import build_tokenizer
from services.router.text_stream import TextStream

TEXTS = ["def add(a, b):\n    return a + b  # sum", "emoji: 🙂🚀✨ and 👩‍👩‍👧 family", "日本語のテキストと中文文本",
         "café naïve Zürich — “quotes”", "  leading spaces\tand\ttabs\n\n", "mixed 🙂日本 code(x)\n"]


def tokenizers():
    yield "tiny", build_tokenizer()
    real = cache_dir() / "models" / PRESETS["default-target"].name
    if (real / "tokenizer.json").exists():
        yield "qwen2.5", AutoTokenizer.from_pretrained(real)


def streamed(tokenizer, ids: list[int], stops: list[str]) -> tuple[str, bool]:
    stream, out = TextStream(tokenizer, stops), []
    for token in ids:
        stream.add(token)
        out.append(stream.take())
        if stream.stopped:
            break
    out.append(stream.take(final=True))
    return "".join(out), stream.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_equals_full_decoding(text: str) -> None:
    for _, tokenizer in tokenizers():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert streamed(tokenizer, ids, [])[0] == tokenizer.decode(ids)


@pytest.mark.parametrize("text,stop", [(TEXTS[0], "return"), (TEXTS[1], "🚀"), (TEXTS[2], "中文"), (TEXTS[0], ":")])
def test_stop_string_is_cut_exactly(text: str, stop: str) -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, stopped = streamed(tokenizer, ids, [stop, "never-there"])
    assert stopped and out == text[:text.index(stop)]


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    tokenizer = build_tokenizer()
    stream = TextStream(tokenizer, ["STOP"])
    for token in tokenizer.encode("abc ST", add_special_tokens=False):
        stream.add(token)
    assert stream.take() == "abc "
    assert stream.take(final=True) == "ST"


def test_a_stop_string_waits_for_min_tokens() -> None:
    """The first min_tokens tokens cannot end the output (vLLM's rule): a stop string counts only when it ends in
    later text, wherever it begins."""
    text, stop = "x = 1\nx = 2\nx = 3\n", "x ="
    for _, tokenizer in tokenizers():
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(ids)
        for min_tokens in range(len(ids) + 2):
            held_until = len(tokenizer.decode(ids[:min_tokens]))
            cut = full.find(stop, max(0, held_until - len(stop) + 1))
            stream, out = TextStream(tokenizer, [stop]), []
            for count, token in enumerate(ids, 1):
                stream.add(token, may_stop=count > min_tokens)
                out.append(stream.take())
                if stream.stopped:
                    break
            out.append(stream.take(final=True))
            assert "".join(out) == (full[:cut] if cut >= 0 else full), (min_tokens, out)
            assert stream.stopped == (cut >= 0)
