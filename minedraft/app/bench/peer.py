"""Peers in the benchmark: any OpenAI-compatible HTTP server, driven with the same prompts as our modes.

`--peer NAME=URL` drives a server that is already running; the built-in names `llamacpp` (the target alone)
and `llamacpp-spec` (with the 0.5B draft, its own speculative decoding) start llama.cpp's server from
`scripts/peer-llamacpp` on the same GGUF files and cores, with one slot per stream, and stop it afterwards.
Greedy decoding, the same max tokens; the official `openai` client streams each answer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from minedraft.app.bench.metrics import RequestRecord

if TYPE_CHECKING:  # imported where a peer is driven: `minedraft bench` without one runs where openai is absent
    from openai import AsyncOpenAI  # (the GPU image: scripts/gpu-check)

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "peer-llamacpp"
BUILT_IN = {"llamacpp": [], "llamacpp-spec": ["--spec"]}
SLOT_CONTEXT = 2048  # tokens per llama.cpp slot: a HumanEval prompt and its answer fit


def parse_peers(specs: list[str]) -> dict[str, str]:
    """NAME=URL, or a built-in name (its URL is decided when it starts)."""
    peers = {}
    for spec in specs:
        name, _, url = spec.partition("=")
        if not url and name not in BUILT_IN:
            raise SystemExit(f"--peer {spec}: give NAME=URL, or one of {', '.join(BUILT_IN)}")
        peers[name] = url
    return peers


@contextmanager
def running_peer(name: str, url: str, concurrency: int, port: int, timeout_s: float = 600.0):
    """Yields the peer's base URL; a built-in peer runs for the duration of the block."""
    if url:
        yield url.rstrip("/")
        return
    command = [str(SCRIPT), "serve", str(port), *BUILT_IN[name], "-np", str(concurrency),
               "-c", str(SLOT_CONTEXT * concurrency)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(base):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} at start ({' '.join(command)})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy after {timeout_s:.0f}s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


async def _one(client: AsyncOpenAI, item: dict, max_tokens: int) -> RequestRecord:
    from openai import APIError

    submitted, first, tokens = time.time(), None, 0
    common = {"model": "peer", "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
              "stream_options": {"include_usage": True}}
    try:
        if "messages" in item:
            stream = await client.chat.completions.create(messages=item["messages"], **common)
        else:
            stream = await client.completions.create(prompt=item["prompt"], **common)
        async for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                text = choice.delta.content if hasattr(choice, "delta") else choice.text
                if text:
                    first = first or time.time()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except APIError as error:
        return RequestRecord(submitted, first, time.time(), tokens, error=f"{type(error).__name__}: {error}")
    return RequestRecord(submitted, first, time.time(), tokens)


async def drive_peer(base_url: str, items: list[dict], concurrency: int, max_tokens: int) -> list[RequestRecord]:
    """Closed loop with `concurrency` streams, as the modes are driven."""
    from openai import AsyncOpenAI

    records: list[RequestRecord] = []
    queue = list(reversed(items))
    # A connection per request: llama.cpp's server drops a kept-alive connection after a streamed answer, and a
    # pooled one reused in that instant failed 1-2 of every 8 requests at C = 1 ("Server disconnected without
    # sending a response"), each counted as an error. Opening one on loopback costs well under a millisecond.
    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("PEER_API_KEY", "none"),
                           max_retries=0, timeout=3600, default_headers={"Connection": "close"}) as client:

        async def stream_worker() -> None:
            while queue:
                records.append(await _one(client, queue.pop(), max_tokens))

        await asyncio.gather(*(stream_worker() for _ in range(concurrency)))
    return records


def run_peer(name: str, url: str, items: list[dict], concurrency: int, max_tokens: int, port: int,
             warmup: list[dict]) -> dict:
    """The raw material of a peer's summary, in the shape run_mode returns (no lanes, no device events)."""
    with running_peer(name, url, concurrency, port) as base:
        asyncio.run(drive_peer(base, warmup, len(warmup), max_tokens))  # as long as ours (driver.run_mode)
        records = asyncio.run(drive_peer(base, items, concurrency, max_tokens))
    return {"records": records, "lanes": [], "events": []}
