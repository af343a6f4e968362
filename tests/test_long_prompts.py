"""Long prompts run in chunks: the same logits as one forward, and memory that grows linearly with length."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from minedraft.engine import model_runner
from minedraft.engine.model_runner import ModelRunner, SequenceState

PEAK_SCRIPT = """
import json, resource, sys
from minedraft.engine.model_runner import ModelRunner, SequenceState
path, kv, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
runner = ModelRunner.load(path, dtype="float32", kv=kv, max_seqs=1, max_context=n + 8)
warm = SequenceState([i % 300 + 3 for i in range(600)])  # first-call costs: one full chunk and a tail
runner.forward([warm], logits_to_keep=1)
runner.drop(warm)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
runner.forward([SequenceState([i % 300 + 3 for i in range(n)])], logits_to_keep=1)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_chunked_prefill_gives_the_logits_of_one_forward(tiny_pair, monkeypatch, kv) -> None:
    monkeypatch.setattr(model_runner, "PREFILL_CHUNK", 256)
    prompt = [i % 300 + 3 for i in range(700)]  # two full chunks and a partial one
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float64", kv=kv, max_seqs=2, max_context=1000)
    chunked_state = SequenceState(list(prompt))
    chunked = runner.forward([chunked_state], logits_to_keep=3)
    monkeypatch.setattr(model_runner, "PREFILL_CHUNK", 1 << 20)
    whole_state = SequenceState(list(prompt))
    whole = runner.forward([whole_state], logits_to_keep=3)
    assert torch.allclose(chunked, whole, atol=1e-9)
    assert chunked_state.kv_len == whole_state.kv_len == len(prompt)
    step = [runner.forward([s], logits_to_keep=1) for s in (chunked_state, whole_state)
            if not s.tokens.append(7)]  # one decode step on each cache: the cached keys agree too
    assert torch.allclose(step[0], step[1], atol=1e-9)


def test_prefill_memory_grows_linearly_with_the_prompt(tiny_pair) -> None:
    """Peak resident memory a prefill adds, at 1k/2k/4k/8k tokens: a dense n x n mask alone would add 256 MiB
    at 8k (float32) and quadruple per doubling; chunked, each doubling adds about as much as the last. (The
    dynamic layout: the tiny model's static cache stops at its 1024 positions.)"""
    kv = "dynamic"
    peaks = {}
    for n in (1024, 2048, 4096, 8192):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tiny_pair[0]), kv, str(n)], check=True,
                             capture_output=True, text=True, timeout=300)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak MiB added by a prefill ({kv} KV): {peaks}")
    assert peaks[8192] < 96, peaks
    assert peaks[8192] - peaks[4096] < 3 * max(peaks[4096] - peaks[2048], 4.0), peaks
