"""The batched runner must give every sequence exactly what running it alone, uncached, would."""

import torch
from transformers import AutoModelForCausalLM

from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.precision import use_onednn_linears

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_batched_cached_decoding_matches_uncached_reference(tiny_pair) -> None:
    target, _ = tiny_pair
    runner = ModelRunner.load(str(target), dtype="float64", kv="dynamic")
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
    runner = ModelRunner.load(str(target), dtype="float64", kv="dynamic")
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


def test_onednn_linears_keep_greedy_tokens_and_logits(tiny_pair) -> None:
    target, _ = tiny_pair
    plain = ModelRunner.load(str(target), dtype="float32", cpu_linear="torch")
    fast = ModelRunner.load(str(target), dtype="float32", cpu_linear="torch")
    assert use_onednn_linears(fast.model, min_params=0) > 0  # tiny layers: force the swap
    runs = []
    for runner in (plain, fast):
        states = [SequenceState(list(p)) for p in PROMPTS]
        logits = []
        for _ in range(8):
            step = runner.forward(states, logits_to_keep=1)[:, -1]
            logits.append(step)
            for i, state in enumerate(states):
                state.tokens.append(int(step[i].argmax()))
        runs.append(([s.tokens for s in states], torch.stack(logits)))
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)
