"""The whole product over real gRPC on loopback: speculation may change speed, never output."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minedraft.app.client import collect, make_request, stream
from minedraft.protos import common_pb2, draft_pb2_grpc, target_pb2_grpc
from tests.conftest import channel_to

PROMPTS = ["def add(a, b):", "Hello", "The quick brown fox jumps over the lazy dog. " * 4, "日本語のテキスト",
           "for i in range(10):\n", "class Lane:", "emoji: 🙂", "import torch\nx = ", "a", "Speculative decoding"]
MAX_TOKENS = 40


def run_all(cluster, prompts: list[str], stagger_s: float = 0.01, **params) -> list:
    """Runs every prompt concurrently, each starting a little later, so requests join mid-flight."""

    def one(i: int):
        time.sleep(i * stagger_s)
        with channel_to(cluster) as channel:
            return collect(stream(channel, make_request(prompt=prompts[i], max_tokens=MAX_TOKENS, **params),
                                  timeout=60))

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts))))


def reference_greedy(target_path, prompt: str, max_tokens: int) -> list[int]:
    """Target-only greedy decoding without any cache, batching or service: the ground truth."""
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float64).eval()
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    out = []
    with torch.no_grad():
        while len(out) < max_tokens:
            token = int(model(torch.tensor([tokens + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return out


def test_greedy_output_identical_in_every_mode(tiny_clusters, tiny_pair) -> None:
    results = {mode: run_all(cluster, PROMPTS) for mode, cluster in tiny_clusters.items()}
    tokens = {mode: [r.token_ids for r in rs] for mode, rs in results.items()}
    assert tokens["sd"] == tokens["ar"]
    assert tokens["psd"] == tokens["ar"]
    assert [r.text for r in results["psd"]] == [r.text for r in results["ar"]]
    for prompt, ids in list(zip(PROMPTS, tokens["ar"], strict=True))[:3]:
        assert ids == reference_greedy(str(tiny_pair[0]), prompt, MAX_TOKENS)
    drafted = sum(int(r.stats["drafted_tokens"]) for r in results["psd"])
    accepted = sum(int(r.stats["accepted_tokens"]) for r in results["psd"])
    assert 0 < accepted < drafted, "both acceptance and rejection must be exercised"
    assert all(int(r.stats["drafted_tokens"]) == 0 for r in results["ar"])


def test_identical_draft_has_every_token_accepted(clusters, identical_pair) -> None:
    results = run_all(clusters.get("psd", identical_pair), PROMPTS[:4])
    for result in results:
        assert int(result.stats["drafted_tokens"]) > 0
        assert result.stats["accepted_tokens"] == result.stats["drafted_tokens"]


def test_seeded_sampling_is_reproducible(tiny_clusters) -> None:
    psd = tiny_clusters["psd"]
    params = {"temperature": 0.9, "top_p": 0.95}
    first = run_all(psd, PROMPTS[:3], seed=11, **params)
    again = run_all(psd, PROMPTS[:3], seed=11, **params)
    other = run_all(psd, PROMPTS[:3], seed=12, **params)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    assert all(r.stats["seed"] == "11" for r in first)


@pytest.mark.parametrize("mode", ["ar", "psd"])
def test_stop_string_cuts_exactly(tiny_clusters, mode: str) -> None:
    cluster = tiny_clusters[mode]
    with channel_to(cluster) as channel:
        full = collect(stream(channel, make_request(prompt=PROMPTS[0], max_tokens=MAX_TOKENS)))
        clean = [i for i in range(4, len(full.text) - 3) if "\ufffd" not in full.text[i:i + 3]]
        start = clean[len(clean) // 2]
        stop = full.text[start:start + 3]
        cut = collect(stream(channel, make_request(prompt=PROMPTS[0], max_tokens=MAX_TOKENS, stop=[stop, "zzzz"])))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids


def test_chat_messages_are_accepted(tiny_clusters) -> None:
    with channel_to(tiny_clusters["psd"]) as channel:
        result = collect(stream(channel, make_request(
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            max_tokens=8)))
    assert result.finish_reason in ("length", "eos") and int(result.stats["prompt_tokens"]) > 5


def held_sequences(cluster) -> tuple[int, int]:
    release = common_pb2.ReleaseRequest(seq_ids=[])
    with grpc.insecure_channel(cluster.draft_address) as d, grpc.insecure_channel(cluster.target_address) as t:
        token = [("authorization", f"Bearer {cluster.internal_token}")]  # only routers may call them
        return (draft_pb2_grpc.DraftStub(d).Release(release, metadata=token).still_held,
                target_pb2_grpc.TargetStub(t).Release(release, metadata=token).still_held)


def test_cancelled_stream_releases_state_on_both_services(tiny_clusters) -> None:
    cluster = tiny_clusters["psd"]
    with channel_to(cluster) as channel:
        responses = stream(channel, make_request(prompt=PROMPTS[2], max_tokens=800))
        next(responses)
        assert held_sequences(cluster) == (1, 1)
        responses.cancel()
    deadline = time.monotonic() + 10
    while held_sequences(cluster) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_sequences(cluster) == (0, 0)


def test_empty_prompt_is_invalid_argument_and_service_keeps_serving(tiny_clusters) -> None:
    with channel_to(tiny_clusters["psd"]) as channel:
        with pytest.raises(grpc.RpcError) as error:
            collect(stream(channel, make_request(prompt="")))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert collect(stream(channel, make_request(prompt="Hello", max_tokens=3))).finish_reason


def test_auto_mode_and_lane_switching_change_no_token(clusters, tiny_pair, tiny_clusters) -> None:
    expected = [r.token_ids for r in run_all(tiny_clusters["ar"], PROMPTS)]
    auto = clusters.get("auto", tiny_pair, max_batch=4)
    assert [r.token_ids for r in run_all(auto, PROMPTS, stagger_s=0.03)] == expected


def test_chunked_draft_prefill_changes_no_token(clusters, tiny_pair, tiny_clusters) -> None:
    """Every prompt in its own draft prefill call (a 1-token budget): same tokens as target-only."""
    chunked = clusters.get("psd", tiny_pair, max_batch=4, draft_prefill_tokens=1)
    assert [r.token_ids for r in run_all(chunked, PROMPTS)] == \
        [r.token_ids for r in run_all(tiny_clusters["ar"], PROMPTS)]
