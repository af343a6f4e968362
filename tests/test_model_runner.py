"""The batched runner must give every sequence exactly what running it alone, uncached, would."""

import torch
from transformers import AutoModelForCausalLM

from minedraft.model_runner import ModelRunner, SequenceState

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_batched_cached_decoding_matches_uncached_reference(tiny_pair) -> None:
    target, _ = tiny_pair
    runner = ModelRunner.load(str(target), dtype="float64")
    reference = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float64).eval()
    states = [SequenceState(list(p)) for p in PROMPTS]
    for _ in range(10):
        logits = runner.forward(states, logits_to_keep=1)
        for i, state in enumerate(states):
            state.tokens.append(int(logits[i, -1].argmax()))
    for prompt, state in zip(PROMPTS, states, strict=True):
        assert state.tokens[len(prompt):] == reference_greedy(reference, prompt, 10)


def test_multi_token_feed_and_truncation_match_reference(tiny_pair) -> None:
    """Feeding several tokens at once, then rolling back, leaves a cache identical to a fresh one."""
    target, _ = tiny_pair
    runner = ModelRunner.load(str(target), dtype="float64")
    long, short = SequenceState(list(range(3, 15))), SequenceState([40, 41])
    runner.forward([long, short], logits_to_keep=1)
    long.tokens += [50, 51, 52]
    short.tokens += [60]
    logits = runner.forward([long, short], logits_to_keep=3)
    fresh = SequenceState(list(long.tokens))
    assert torch.allclose(logits[0], runner.forward([fresh], logits_to_keep=3)[0], atol=1e-10)
    long.truncate(13)  # drop two of the three fed tokens
    long.tokens.append(70)
    rolled = runner.forward([long], logits_to_keep=1)[0, -1]
    expected = runner.forward([SequenceState(list(long.tokens))], logits_to_keep=1)[0, -1]
    assert torch.allclose(rolled, expected, atol=1e-10)
    assert long.kv_len == len(long.tokens)
