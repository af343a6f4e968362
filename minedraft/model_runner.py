"""One causal LM on one device, run as a batch over sequences that each keep their own KV cache.

Shared by the draft and the target service. Every call is one batched forward, whatever the
sequences' lengths: each sequence's cached keys/values are right-aligned in a padded past, its new
tokens right-aligned in a padded input, and an explicit 4D mask hides the padding. Right-aligning
the inputs puts every sequence's last positions in the same columns, so `logits_to_keep` works.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.utils.mkldnn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class SequenceState:
    """Tokens a service holds for one sequence, and the KV cache of the first `kv_len` of them."""

    tokens: list[int]
    kv: torch.Tensor | None = None  # [layers, 2, kv_heads, kv_len, head_dim]
    extra: dict = field(default_factory=dict)  # per-service data (sampling state)

    @property
    def kv_len(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    def truncate(self, length: int) -> None:
        """Forgets every token from `length` on, and their cached keys/values."""
        del self.tokens[length:]
        if self.kv is not None and self.kv.shape[3] > length:
            self.kv = self.kv[:, :, :, :length].clone() if length else None


ONEDNN_MIN_PARAMS = 1 << 20


def use_onednn_linears(module: torch.nn.Module, min_params: int = ONEDNN_MIN_PARAMS) -> int:
    """Swaps large float32 CPU linears for oneDNN (mkldnn) ones; returns how many were swapped.

    On CPU, F.linear takes a much slower GEMM path for a few rows than for one: a 5-token verify of the
    1.5B target cost 2.0x a 1-token decode at batch 1. oneDNN brings that to 1.3x and cuts batch-8
    decode by a third (DESIGN.md §4). Small layers are left alone: there oneDNN's overhead dominates.
    """
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and child.in_features * child.out_features >= min_params:
            setattr(module, name, torch.utils.mkldnn.to_mkldnn(torch.nn.Sequential(child))[0])
            swapped += 1
        else:
            swapped += use_onednn_linears(child, min_params)
    return swapped


class ModelRunner:
    def __init__(self, model: PreTrainedModel, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.config.vocab_size

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
             cpu_linear: str = "onednn", **load_kwargs) -> ModelRunner:
        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **load_kwargs)
        model.to(device).eval()
        swapped = 0
        if cpu_linear == "onednn" and device == "cpu" and dtype == "float32" and torch.backends.mkldnn.is_available():
            swapped = use_onednn_linears(model)
        log.info("loaded %s (%s, %s, %d oneDNN linears) in %.1fs", path, dtype, device, swapped,
                 time.perf_counter() - started)
        return cls(model, torch.device(device))

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    @torch.inference_mode()
    def forward(self, states: list[SequenceState], logits_to_keep: int) -> torch.Tensor:
        """Feeds each sequence its uncached tokens in one batched forward and caches them.

        Returns logits [batch, logits_to_keep, vocab] for each sequence's last positions (row i's
        last m entries belong to sequence i's last m tokens).
        """
        for state in states:
            if state.kv_len >= len(state.tokens):  # fully cached: recompute the last token for its logits
                state.kv = state.kv[:, :, :, :len(state.tokens) - 1] if len(state.tokens) > 1 else None
        feeds = [s.tokens[s.kv_len:] for s in states]
        batch, n_new = len(states), max(len(f) for f in feeds)
        n_past = max(s.kv_len for s in states)
        input_ids = torch.zeros((batch, n_new), dtype=torch.long)
        position_ids = torch.zeros((batch, n_new), dtype=torch.long)
        key_valid = torch.zeros((batch, n_past + n_new), dtype=torch.bool)
        for i, (state, feed) in enumerate(zip(states, feeds, strict=True)):
            start = n_new - len(feed)
            input_ids[i, start:] = torch.tensor(feed)
            position_ids[i, start:] = torch.arange(state.kv_len, state.kv_len + len(feed))
            key_valid[i, n_past - state.kv_len:n_past] = True
            key_valid[i, n_past + start:] = True
        causal = torch.arange(n_past + n_new)[None, :] <= (n_past + torch.arange(n_new))[:, None]
        allowed = causal[None, None] & key_valid[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)

        cache = DynamicCache(config=self.model.config)
        if n_past:
            past = self._padded_past(states, n_past)
            cache = DynamicCache(ddp_cache_data=[(layer[0], layer[1]) for layer in past],
                                 config=self.model.config)
        out = self.model(input_ids=input_ids.to(self.device), position_ids=position_ids.to(self.device),
                         attention_mask=mask.to(self.device), cache=cache, use_cache=True,
                         logits_to_keep=logits_to_keep)
        self._store_new_kv(states, feeds, out.cache, n_past, n_new)
        return out.logits

    def _padded_past(self, states: list[SequenceState], n_past: int) -> torch.Tensor:
        ref = next(s.kv for s in states if s.kv is not None)
        layers, _, heads, _, head_dim = ref.shape
        past = torch.zeros((layers, 2, len(states), heads, n_past, head_dim), dtype=ref.dtype,
                           device=ref.device)
        for i, state in enumerate(states):
            if state.kv is not None:
                past[:, :, i, :, n_past - state.kv_len:] = state.kv
        return past

    @staticmethod
    def _store_new_kv(states: list[SequenceState], feeds: list[list[int]], cache: DynamicCache,
                      n_past: int, n_new: int) -> None:
        full = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
        total = n_past + n_new
        for i, (state, feed) in enumerate(zip(states, feeds, strict=True)):
            new = full[:, :, i, :, total - len(feed):]
            if state.kv is None:
                state.kv = new.clone()
            else:
                old = full[:, :, i, :, n_past - state.kv_len:n_past]
                state.kv = torch.cat([old, new], dim=3)
