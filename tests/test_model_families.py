"""Every common decoder family runs on both cache layouts, token-identical to its own uncached forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from minedraft.engine.model_runner import STATIC_ONLY, ModelRunner, SequenceState
from minedraft.engine.static_kv import StaticKV

SHAPE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
         "eos_token_id": None, "bos_token_id": None, "pad_token_id": 0}
FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "phi3": Phi3Config, "gemma2": Gemma2Config,
            "qwen2": Qwen2Config}
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"head_dim": 16} if family == "gemma2" else {}
    return AutoModelForCausalLM.from_config(FAMILIES[family](**SHAPE, **extra), dtype=torch.float64).eval()


def uncached_greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("layout", ["dynamic", "static", "static-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_decodes_like_its_uncached_self(family: str, layout: str) -> None:
    if layout == "dynamic" and family in STATIC_ONLY:
        pytest.skip(f"{family} runs on the static layout only (ModelRunner.load refuses the dynamic one)")
    model = tiny_model(family)
    static = None if layout == "dynamic" else StaticKV(
        model.config, 4, 128, torch.float64, torch.device("cpu"), pad_shapes=layout == "static-padded")
    runner = ModelRunner(model, torch.device("cpu"), static)
    states = [SequenceState(list(p)) for p in PROMPTS]
    for step in range(8):
        if step == 4:  # a multi-token feed and a rollback, as a verify does
            states[0].tokens += [40, 41, 42]
            runner.forward(states, logits_to_keep=1)
            states[0].truncate(len(states[0].tokens) - 3)
        logits = runner.forward(states, logits_to_keep=1)
        for i, state in enumerate(states):
            state.tokens.append(int(logits[i, -1].argmax()))
    assert [s.tokens for s in states] == [uncached_greedy(model, p, 8) for p in PROMPTS]
