"""`--quant int4-w8a8-prompt` (a target format for CPUs without VNNI): a sequence's prompt positions run in W8A8, the
tokens generated after it in int4. Which format computes a position must depend on that position alone —
never on how the service batched or cut its calls — or speculation could change the target's tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import DynamicCache

from minedraft.engine import prompt_rows
from minedraft.engine.model_runner import ModelRunner, SequenceState, cache_kwarg
from minedraft.engine.sampling import Sampling
from services.target.engine import TargetEngine
from tests.test_engines import PROMPTS

QUANT = "int4-w8a8-prompt"
STEPS = 8


def fed(tokens: list[int], kv_len: int, prompt_len: int) -> SimpleNamespace:
    return SimpleNamespace(tokens=tokens, kv_len=kv_len, prompt_len=prompt_len)


def test_rows_are_prompt_before_the_prompt_length_wherever_the_call_cuts() -> None:
    assert prompt_rows.rows_of([fed([1] * 5, 0, 5), fed([1] * 9, 3, 9)]) is True
    assert prompt_rows.rows_of([fed([1] * 6, 5, 5), fed([1] * 12, 9, 9)]) is False
    mixed = prompt_rows.rows_of([fed([1] * 6, 3, 5), fed([1] * 10, 9, 9)])
    # right-aligned feeds of 3 and 1 tokens: positions 3, 4 | 5 and, for the other, position 9
    assert mixed.tolist() == [[True, True, False], [False, False, False]]
    with prompt_rows.feeding([fed([1] * 6, 3, 5), fed([1] * 10, 9, 9)]):
        assert prompt_rows.current(torch.zeros(2, 3, 4)).tolist() == [True, True, False, False, False, False]
        assert prompt_rows.current(torch.zeros(2, 1, 4)).tolist() == [False, False]  # the head's kept rows
    assert prompt_rows.current(torch.zeros(2, 3, 4)) is False  # outside a forward: generated


def reference_tokens(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Transformers' own cache: the prompt in one forward marked prompt, then one generated token at a time."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), prompt_rows.feeding([fed(prompt, 0, len(prompt))]):
        logits = model(torch.tensor([prompt]), use_cache=True, **{cache_kwarg(model): cache}).logits
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        with torch.no_grad(), prompt_rows.feeding([fed(tokens, len(tokens) - 1, len(prompt))]):
            logits = model(torch.tensor([tokens[-1:]]), use_cache=True, **{cache_kwarg(model): cache}).logits
    return tokens


def test_batched_cached_decoding_equals_prompt_then_generated_reference(tiny_pair) -> None:
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float32", quant=QUANT)
    prompts = list(PROMPTS.values())
    states = [SequenceState(list(p)) for p in prompts]
    for _ in range(STEPS):
        logits = runner.forward(states, logits_to_keep=1)
        for i, state in enumerate(states):
            state.tokens.append(int(logits[i, -1].argmax()))
    for prompt, state in zip(prompts, states, strict=True):
        assert state.tokens[:-1] == reference_tokens(runner.model, list(prompt), STEPS - 1)
    # The check means something only if the two formats give different numbers here.
    ids = torch.tensor([list(prompts[0])])
    with torch.no_grad(), prompt_rows.feeding([fed(list(prompts[0]), 0, ids.shape[1])]):
        as_prompt = runner.model(ids).logits
    with torch.no_grad():
        assert not torch.allclose(as_prompt, runner.model(ids).logits, atol=1e-3)


def test_a_call_feeding_prompt_and_generated_rows_computes_each_in_its_own_format(tiny_pair) -> None:
    """A sequence fed its prompt and three later tokens in one call (as a draft catching up, or any batch that
    mixes them) gives the logits of the prompt run alone and the three tokens run after it."""
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float32", quant=QUANT)
    prompt = list(PROMPTS["a"])
    later = [11, 12, 13]
    together = SequenceState(prompt + later, prompt_len=len(prompt))
    mixed = runner.forward([together, SequenceState(list(prompt))], logits_to_keep=3)[0]
    apart = SequenceState(list(prompt))
    runner.forward([apart], logits_to_keep=1)
    apart.tokens += later
    stepped = runner.forward([apart], logits_to_keep=3)[0]
    assert torch.allclose(mixed, stepped, atol=1e-5)
    all_prompt = SequenceState(prompt + later)  # the same tokens, all counted as prompt
    assert not torch.allclose(runner.forward([all_prompt], logits_to_keep=3)[0], stepped, atol=1e-3)


def test_a_target_prefill_counts_the_samplings_prompt_length_as_prompt(tiny_pair) -> None:
    """A request moved from another cell arrives as prompt + output, its sampling saying where the output begins
    (as the router sets it for every request): the target computes that output as output, so its next token is
    the one the first cell would have chosen — the prompt, then each token stepped after it."""
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float32", quant=QUANT)
    target = TargetEngine(runner)
    prompt, output = list(PROMPTS["a"]), [11, 12, 13]
    moved, _ = target.prefill([("moved", prompt + output, Sampling(prompt_len=len(prompt))),
                               ("past-end", prompt + output, Sampling(prompt_len=99))])
    assert target.table.get("moved").prompt_len == len(prompt)
    assert target.table.get("past-end").prompt_len == len(prompt + output)  # at most every token
    stepped = SequenceState(list(prompt))
    runner.forward([stepped], logits_to_keep=1)
    stepped.tokens += output
    assert moved.next_token == int(runner.forward([stepped], logits_to_keep=1)[0, -1].argmax())
