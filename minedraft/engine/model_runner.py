"""One causal LM on one device, run as a batch over sequences that each keep their own KV cache.

Shared by the draft and the target service. Every call is one batched forward, whatever the
sequences' lengths: each sequence's new tokens are right-aligned in a padded input (so every row's
last positions share columns, and `logits_to_keep` works) and an explicit 4D mask hides the padding.
Two cache layouts, same results:
- static (the default on every device): preallocated slots written in place (`static_kv`) and read in place by
  attention (`slot_attention`), with fixed-shape steps replayed as CUDA graphs on a GPU (`cuda_graphs`).
- dynamic (`kv="dynamic"`, `dynamic_kv`): each sequence owns a KV tensor; a call right-aligns them in a padded past.
Prompts longer than PREFILL_CHUNK run in chunks, so a prefill's memory grows linearly with its length.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from minedraft.engine import slot_attention
from minedraft.engine.cuda_graphs import StepGraphs
from minedraft.engine.dynamic_kv import forward_dynamic
from minedraft.engine.lean_forward import LeanForward, supported
from minedraft.engine.precision import resolve_dtype, use_onednn_linears
from minedraft.engine.prompt_rows import feeding
from minedraft.engine.quantized_cache import quantize_cached
from minedraft.engine.sampling import Sampling
from minedraft.engine.static_kv import StaticKV, bucket, fit_context, uses_static_kv
from minedraft.engine.trimmed_head import trim_output_head, trimmed_rows
from minedraft.models.random_shapes import is_random, random_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class SequenceState:
    """Tokens a service holds for one sequence, and the KV cache of the first `kv_len` of them."""

    tokens: list[int]
    kv: torch.Tensor | None = None  # dynamic layout: [layers, 2, kv_heads, kv_len, head_dim]
    slot: int | None = None  # static layout: this sequence's row of the preallocated cache
    kv_len: int = 0  # how many of `tokens` have cached keys/values (changed only by the methods below)
    sampling: Sampling = field(default_factory=Sampling)
    generator: torch.Generator | None = None  # this sequence's own random stream (sampled decoding)
    owner: str = ""  # the router that made it (its calls' `minedraft-owner` metadata)
    expires_at: float = float("inf")  # time.monotonic() after which an unused sequence is dropped
    prompt_len: int = -1  # leading tokens that are its prompt (prompt_rows); -1: the tokens it is made with

    def __post_init__(self) -> None:
        self.prompt_len = len(self.tokens) if self.prompt_len < 0 else self.prompt_len

    def truncate(self, length: int) -> None:
        """Forgets every token from `length` on, and their cached keys/values."""
        del self.tokens[length:]
        self.uncache_from(length)

    def mark_cached(self) -> None:
        """Every token now has cached keys/values (after a forward)."""
        self.kv_len = len(self.tokens)

    def forget_cache(self) -> None:
        """No cached keys/values (a slot just taken, or given back)."""
        self.kv_len, self.kv = 0, None

    def uncache_from(self, length: int) -> None:
        if self.kv_len > length:
            self.kv_len = length
            if self.kv is not None:
                self.kv = self.kv[:, :, :, :length].clone() if length else None


LONG_FEED = 16  # tokens fed to one sequence beyond which a call is a prefill, not a decode or verify step
PREFILL_CHUNK = 512  # a longer prompt runs in chunks of this many tokens (memory linear in its length)
STATIC_ONLY = frozenset({"gemma2"})  # tests/test_model_families.py: the dynamic layout diverges for these


def load_model(path: str, device: str, dtype: torch.dtype, **load_kwargs) -> PreTrainedModel:
    model = random_model(path, device, dtype) if is_random(path) else \
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load_kwargs).to(device).eval()
    return model.requires_grad_(False)  # inference only: no step may record autograd history


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str | None) -> Iterator[None]:
    """Runs the model's layers with attention function `name` (None: its own); they read it at every call."""
    if name is None:
        yield
        return
    own = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = own


def cache_kwarg(model: PreTrainedModel) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); the GPU image may hold an older 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ModelRunner:
    def __init__(self, model: PreTrainedModel, device: torch.device, static: StaticKV | None = None,
                 cuda_graphs: bool = False) -> None:
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.config.vocab_size
        self.static = static
        self._cache_kwarg = cache_kwarg(model)
        self.graphs = None
        # On the CPU's rows attention Llama-family layers run as a flat list of operators, same bits.
        lean = static and static.attention == "rows" and device.type == "cpu" and supported(model)
        self.lean = LeanForward(model) if lean else None
        if static and cuda_graphs:  # the gather path's shapes carry a width: captured as they come
            self.graphs = StepGraphs(self._static_step, self._scratch_inputs, lazy=static.attention == "gather")

    @torch.inference_mode()  # as every step runs: no autograd history in the cache, and varlen's kernel needs it
    def capture_graphs(self, max_tokens: int) -> int:
        """Captures every batch bucket x token bucket (1, 2, 3, 5, 9, ... up to `max_tokens`) now, at start-up."""
        if not self.graphs or self.graphs.lazy:
            return 0
        tokens = sorted({1, max_tokens} | {2 ** i + 1 for i in range(max_tokens.bit_length()) if 2 ** i < max_tokens})
        self.static.token_buckets = tuple(tokens)
        self.graphs.max_tokens = max_tokens  # longer feeds are prefills: eager by design, not worth a warning
        batches = sorted({bucket(b, 1, self.static.max_seqs) for b in range(1, self.static.max_seqs + 1)})
        return self.graphs.capture_all((self.static.scratch_inputs(b, n).tensors(), n) for b in batches for n in tokens)

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str = "auto", threads: int | None = None,
             cpu_linear: str = "onednn", kv: str = "auto", max_seqs: int = 64, max_context: int = 0,
             cuda_graphs: bool = True, quant: str = "none", kv_memory_fraction: float | None = None,
             graph_tokens: int = 9, quant_cache: Path | None = None, draft_vocab: int = 0,
             **load_kwargs) -> ModelRunner:
        """`dtype`: a DTYPES name or auto (`precision.resolve_dtype`); `quant`: a `precision.QUANTS` format for
        the linears (CPU), kept in `quant_cache` (`quantized_cache`); `kv`: dynamic, static, or auto (static);
        `max_seqs`/`max_context` size the static cache, which must fit in `kv_memory_fraction` of the device's
        free memory (default 0.9 on a GPU, 0.4 on a CPU; `max_context` 0: the model's limit, at most 4096, shrunk
        to what fits — `static_kv.fit_context`); CUDA graphs of steps feeding up to `graph_tokens` tokens per row
        (k_max + 1) are captured before it returns; `draft_vocab` > 0 (a draft only): its output head computes
        the first `draft_vocab` ids and the special tokens (`trimmed_head`)."""
        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        dtype = resolve_dtype(dtype, device)
        if quant != "none" and torch.device(device).type != "cpu":
            raise ValueError(f"--quant {quant} runs on the CPU only (torch's packed CPU kernels)")

        def loaded() -> PreTrainedModel:
            model = load_model(path, device, DTYPES[dtype], **load_kwargs)
            trim_output_head(model, path, draft_vocab)
            return model

        model, quantized = quantize_cached(loaded(), quant, path, quant_cache, reload=loaded)
        swapped = 0
        if cpu_linear == "onednn" and device == "cpu" and dtype == "float32" and torch.backends.mkldnn.is_available():
            swapped = use_onednn_linears(model)
        on_cuda = torch.device(device).type == "cuda"
        static, graphs = None, False
        if not uses_static_kv(kv, device) and model.config.model_type in STATIC_ONLY:
            raise ValueError(f"{model.config.model_type} models give wrong tokens on the dynamic KV cache "
                             "(left-padded batches); run them with --kv static")
        if uses_static_kv(kv, device):
            graphs = on_cuda and cuda_graphs
            attention = slot_attention.choose(torch.device(device), DTYPES[dtype], model.config, graphs)
            limit = int(getattr(model.config, "max_position_embeddings", 1 << 30))
            if attention == "gather":  # one mask for every layer: exact only up to a sliding window
                limit = min(limit, slot_attention.attention_window(model.config) or limit)
            fraction = kv_memory_fraction or (0.9 if on_cuda else 0.4)  # a CPU host holds both services' caches
            context = fit_context(model.config, max_seqs, max_context, limit, DTYPES[dtype], torch.device(device),
                                  fraction)
            static = StaticKV(model.config, max_seqs, context, DTYPES[dtype], torch.device(device), pad_shapes=graphs,
                              attention=attention)
        log.info("loaded %s (%s, %s linears%s, %s, %d oneDNN linears, %s KV%s%s) in %.1fs", path, dtype, quant,
                 f" ({quantized})" if quantized else "", device, swapped,
                 f"static {max_seqs}x{static.max_context} ({static.bytes / 2**30:.2f} GiB, "
                 f"{static.attention} attention)"
                 if static else "dynamic", ", CUDA graphs" if graphs else "",
                 f", output head over {trimmed_rows(model)} ids" if trimmed_rows(model) else "",
                 time.perf_counter() - started)
        runner = cls(model, torch.device(device), static, cuda_graphs=graphs)
        runner.capture_graphs(graph_tokens)
        return runner

    @property
    def max_context(self) -> int:
        """The longest sequence this runner computes exactly. The gather and dynamic paths pass one mask to every
        layer, so they stop at a sliding window (the router refuses longer requests); in place reads keep it."""
        if self.static:
            return self.static.max_context
        context = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        return min(context, slot_attention.attention_window(self.model.config) or context)

    @property
    def free_slots(self) -> int:
        """New sequences the cache can take now (static KV's free slots; unbounded for the dynamic layout)."""
        return self.static.slots_free if self.static else 1 << 30

    def drop(self, state: SequenceState) -> None:
        """Returns a released sequence's cache space."""
        if self.static:
            self.static.free(state)

    @torch.inference_mode()
    def forward(self, states: list[SequenceState], logits_to_keep: int) -> torch.Tensor:
        """Feeds each sequence its uncached tokens in one batched forward and caches them.

        Returns logits [batch, logits_to_keep, vocab] for each sequence's last positions (row i's
        last m entries belong to sequence i's last m tokens).
        """
        for state in states:  # fully cached: recompute the last token for its logits
            state.uncache_from(len(state.tokens) - 1)
        feeds = [len(s.tokens) - s.kv_len for s in states]
        alone = max(feeds) > LONG_FEED and (min(feeds) < max(feeds) or max(feeds) > PREFILL_CHUNK)
        if len(states) > 1 and alone and logits_to_keep <= min(feeds):
            # Prompts of different lengths: padding each to the longest would compute the padding too (2-3x the
            # work for a batch of HumanEval prompts); alone, each costs its own length.
            return self._all_or_nothing(states, lambda: torch.cat([self.forward([s], logits_to_keep) for s in states]))
        if feeds[0] - logits_to_keep >= PREFILL_CHUNK and len(states) == 1:
            return self._all_or_nothing(states, lambda: self._forward_chunked(states[0], logits_to_keep))
        with feeding(states):
            if self.static:
                return self._forward_static(states, logits_to_keep)
            return forward_dynamic(self.model, self._cache_kwarg, states, logits_to_keep)

    def _all_or_nothing(self, states: list[SequenceState], run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Runs several forwards as one call: if one fails, the slots taken on the way are given back."""
        unassigned = [state for state in states if self.static and state.slot is None]
        try:
            return run()
        except BaseException:
            for state in unassigned:
                self.static.free(state)
            raise

    def _forward_chunked(self, state: SequenceState, logits_to_keep: int) -> torch.Tensor:
        """A long prompt in chunks of PREFILL_CHUNK tokens, each attending to the cache before it: the masks and
        attention scores of one chunk are chunk x context, so memory grows linearly with the prompt."""
        tokens = state.tokens
        try:
            while len(tokens) - state.kv_len - logits_to_keep >= PREFILL_CHUNK:
                state.tokens = tokens[:state.kv_len + PREFILL_CHUNK]
                self.forward([state], logits_to_keep=1)
        finally:
            state.tokens = tokens
        return self.forward([state], logits_to_keep)

    def _forward_static(self, states: list[SequenceState], logits_to_keep: int) -> torch.Tensor:
        assigned = self.static.assign(states)
        try:
            feeds = [s.tokens[s.kv_len:] for s in states]
            step = self.static.inputs(states, feeds).tensors()
            if self.graphs:
                n = step["input_ids"].shape[1]  # a grid graph keeps every position's logits
                logits = self.graphs(step, n if n in self.static.token_buckets else logits_to_keep,
                                     returned=logits_to_keep)
            else:
                logits = self._static_step(logits_to_keep=logits_to_keep, **step)
        except BaseException:
            for state in assigned:
                self.static.free(state)
            raise
        for state in states:
            state.mark_cached()
        return logits[:len(states)]

    def _static_step(self, logits_to_keep: int, **step: torch.Tensor) -> torch.Tensor:
        """One fixed-shape forward over the static cache (what a CUDA graph captures)."""
        cache = self.static.cache_for(step["slots"], step["write_pos"], step["mask"])
        if self.lean:
            return self.lean(step, cache, logits_to_keep)
        # A 4D mask is used as given by every family (Llama, Mistral, Phi-3, Gemma-2, Qwen2); a dict of masks
        # is skipped only by some, and the others' create_causal_mask fails on it.
        extra = {}
        if self.static.paged:  # slot_attention reads each row's slot in place, told where by `slot_step`
            extra.update(slot_step=step, slot_memo={})
        with attention_implementation(self.model, slot_attention.NAME if self.static.paged else None):
            out = self.model(input_ids=step["input_ids"], position_ids=step["position_ids"],
                             attention_mask=step["mask"], use_cache=True, logits_to_keep=logits_to_keep,
                             **{self._cache_kwarg: cache}, **extra)
        return out.logits

    def _scratch_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs of the same shapes that only write to (and read from) the scratch slot, for warm-up and capture."""
        batch, n = inputs["input_ids"].shape
        return self.static.scratch_inputs(batch, n, inputs["mask"].shape[-1]).tensors()
