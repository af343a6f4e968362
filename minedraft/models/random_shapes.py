"""Random-weight models with the shapes of real ones (`random:qwen2.5-0.5b`), built on the device.

For step-time and throughput measurements where the weights' values do not matter but their bytes do
(the GPU check): no download, no disk, seconds to build. The seed fixes the weights.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config

PREFIX = "random:"

_QWEN = {"max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, **_QWEN},
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, **_QWEN},
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False, **_QWEN},
    # CPU stand-ins for trying the GPU check's plumbing (same vocabulary, so the real tokenizer works)
    "tiny-draft": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, **_QWEN},
    "tiny-target": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936,
                    "tie_word_embeddings": True, **_QWEN},
}


def is_random(spec: str) -> bool:
    return spec.startswith(PREFIX)


def random_config(spec: str) -> Qwen2Config:
    name = spec.removeprefix(PREFIX)
    if name not in SHAPES:
        raise ValueError(f"unknown random shape {name!r}; choose from {', '.join(SHAPES)}")
    return Qwen2Config(**SHAPES[name])


def random_model(spec: str, device: str, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(random_config(spec), dtype=dtype)
    return model.eval()

