"""Every common decoder family runs on both cache layouts and each static attention path, token-identical to its
own uncached forward; psd through a cluster equals target-only for non-Qwen families."""

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


def runner_for(model, layout: str) -> ModelRunner:
    """dynamic; static read in place row by row ("rows", the CPU's path); static gathered and padded to the
    shapes a CUDA graph replays ("gather-padded", a graph's path in float32/64)."""
    static = None if layout == "dynamic" else StaticKV(
        model.config, 4, 128, torch.float64, torch.device("cpu"), pad_shapes=layout == "gather-padded",
        attention="rows" if layout == "rows" else "gather")
    return ModelRunner(model, torch.device("cpu"), static)


@pytest.mark.parametrize("layout", ["dynamic", "rows", "gather-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_decodes_like_its_uncached_self(family: str, layout: str) -> None:
    if layout == "dynamic" and family in STATIC_ONLY:
        pytest.skip(f"{family} runs on the static layout only (ModelRunner.load refuses the dynamic one)")
    model = tiny_model(family)
    assert greedy_with_a_verify(runner_for(model, layout), 8, at=4, row=0) == \
        [uncached_greedy(model, p, 8) for p in PROMPTS]


def greedy_with_a_verify(runner: ModelRunner, steps: int, at: int, row: int) -> list[list[int]]:
    """Greedy decoding of PROMPTS; at step `at`, row `row` is fed three tokens and rolled back, as a verify."""
    states = [SequenceState(list(p)) for p in PROMPTS]
    for step in range(steps):
        if step == at:
            states[row].tokens += [40, 41, 42]
            runner.forward(states, logits_to_keep=3)
            states[row].truncate(len(states[row].tokens) - 3)
        logits = runner.forward(states, logits_to_keep=1)
        for i, state in enumerate(states):
            state.tokens.append(int(logits[i, -1].argmax()))
    return [s.tokens for s in states]


def test_a_sliding_window_is_kept_when_reading_slots_in_place() -> None:
    """Mistral with a 5-token window, decoding past it (and a 3-token verify across it): the uncached tokens."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**SHAPE, sliding_window=5), dtype=torch.float64).eval()
    assert greedy_with_a_verify(runner_for(model, "rows"), 10, at=6, row=1) == \
        [uncached_greedy(model, p, 10) for p in PROMPTS]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_psd_through_a_cluster_equals_target_only(family: str, clusters, tmp_path_factory) -> None:
    from minedraft.app.client import collect, make_request, stream
    from minedraft.models.tiny import build_tiny_pair
    from tests.conftest import channel_to

    pair = build_tiny_pair(tmp_path_factory.mktemp(family), noise=0.3, family=family)
    outputs = {}
    for mode in ("ar", "psd"):
        cluster = clusters.get(mode, pair, kv="static", max_seqs=16, max_context=256)
        with channel_to(cluster) as channel:
            outputs[mode] = [collect(stream(channel, make_request(prompt=p, max_tokens=24), timeout=60)).token_ids
                             for p in ("def add(a, b):", "Hello, world!", "for i in range(10):\n")]
    assert outputs["psd"] == outputs["ar"] and all(len(tokens) == 24 for tokens in outputs["ar"])


def test_paths_that_cannot_keep_a_window_stop_at_it() -> None:
    """The dynamic and gather paths give every layer one mask: past a sliding window they would be wrong, so
    their context stops there (the router then refuses longer requests); the in-place path keeps the window."""
    from minedraft.engine.slot_attention import attention_window

    windowed = MistralConfig(**SHAPE, sliding_window=5)
    assert attention_window(windowed) == 5 and attention_window(Qwen2Config(**SHAPE)) is None
    assert attention_window(Gemma2Config(**SHAPE, head_dim=16)) == 4096
    assert attention_window(LlamaConfig(**SHAPE)) is None
    model = AutoModelForCausalLM.from_config(windowed, dtype=torch.float64).eval()
    assert ModelRunner(model, torch.device("cpu")).max_context == 5
    assert runner_for(model, "rows").max_context == 128


def test_varlen_attention_is_chosen_only_where_it_reads_a_paged_cache(monkeypatch) -> None:
    """The GPU image may hold an older torch, or one whose kernel (FA2) refuses block_table when called: choose
    another attention path there rather than fail at the first step."""
    import torch.nn.attention.varlen as varlen

    from minedraft.engine import slot_attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def unpaged(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):  # an older signature
        raise AssertionError("not to be called")

    monkeypatch.setattr(varlen, "varlen_attn", unpaged)
    assert not slot_attention.varlen_available(torch.device("cuda"), torch.bfloat16, 128)

    calls = []

    def paged(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
              enable_gqa=False, seqused_k=None, block_table=None):
        calls.append((tuple(key.shape), block_table.tolist(), seqused_k.tolist()))
        if refuse:
            raise RuntimeError("block_table is only supported with FA3")
        return query

    monkeypatch.setattr(varlen, "varlen_attn", paged)
    cpu = torch.device("cpu")  # the trial call itself, on tensors this machine can hold
    for refuse in (True, False):
        slot_attention._paged_read_runs.cache_clear()
        assert slot_attention._paged_read_runs(cpu, torch.bfloat16, 64) is not refuse
    assert calls == [((1, slot_attention.PAGE, 1, 64), [[0]], [1])] * 2
    slot_attention._paged_read_runs.cache_clear()
