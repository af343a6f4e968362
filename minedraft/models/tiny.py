"""Tiny random-weight model pairs (Qwen2 by default; any family `AutoConfig` knows) for tests and offline demos,
built in well under a second.

The draft is the target with Gaussian noise added to every weight: `noise=0` gives a draft that
must have every token accepted; a small noise gives a realistic partial acceptance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog.", "Speculative decoding drafts tokens cheaply.",
    "import torch\nx = torch.zeros(3, 4)\n", "class Lane:\n    def __init__(self):\n        pass\n",
    "日本語のテキストと中文文本", "emoji: 🙂🚀✨ café naïve", "Hello, world! How are you today?",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small built-in corpus: any UTF-8 text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, layers: int = 2, hidden: int = 64, family: str = "qwen2") -> PretrainedConfig:
    return AutoConfig.for_model(family, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=hidden // 4, max_position_embeddings=1024, initializer_range=0.25,
                                tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def build_tiny_pair(out_dir: str | Path, noise: float = 0.02, seed: int = 0, family: str = "qwen2"
                    ) -> tuple[Path, Path]:
    """Writes `target/` and `draft/` model folders (weights, config, tokenizer) under out_dir."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), family=family)
    config.eos_token_id = tokenizer.eos_token_id
    target = AutoModelForCausalLM.from_config(config)
    draft = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for d, t in zip(draft.parameters(), target.parameters(), strict=True):
            d.copy_(t + noise * torch.randn_like(t) * t.std())
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = out / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
