"""A draft's output head cut to the most common token ids (FR-Spec, arXiv 2502.14856).

The head of a small draft with a large vocabulary is a big share of its step: the 0.5B Qwen draft's 151,936 x 896
head is 136 M of its 494 M weights, read whole at every draft step (14 of 85 ms on one AVX2 core). Byte-level BPE
numbers tokens in merge order, which follows frequency, so the first N ids cover most text (the default pair's
tokenizer, ids below 32,768: 96 % of HumanEval's solution tokens, 93 % of ShareGPT's answers). The draft computes
logits for those ids and its special tokens only; every other id gets -inf, so it is never drafted and q gives it
no mass. Verification is untouched: the target still judges every draft against its whole vocabulary, so output
never changes, and a token the draft cannot name costs a rejection, as any miss does. The draft's own
probabilities (its early stop, TETRIS's scores) are then over the kept ids, so a little more confident.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

ROWS_MULTIPLE = 64  # the kept rows are padded with the next ids to whole blocks (int4 packs outputs by 16)


class TrimmedHead(torch.nn.Module):
    """The head's rows for `kept` ids, scattered into logits over the whole vocabulary (-inf elsewhere), so
    nothing downstream (sampling, logit processors, the sparse q on the wire) sees the cut."""

    def __init__(self, head: torch.nn.Linear, kept: torch.Tensor) -> None:
        super().__init__()
        self.vocab = head.out_features
        rows = torch.nn.Linear(head.in_features, len(kept), bias=head.bias is not None, device="meta",
                               dtype=head.weight.dtype)  # no random initialisation: its weights are set below
        rows.weight = torch.nn.Parameter(head.weight.detach()[kept].clone(), requires_grad=False)
        if head.bias is not None:
            rows.bias = torch.nn.Parameter(head.bias.detach()[kept].clone(), requires_grad=False)
        self.rows = rows.requires_grad_(False)
        self.register_buffer("kept", kept.to(head.weight.device), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.rows(hidden)
        full = logits.new_full((*logits.shape[:-1], self.vocab), float("-inf"))
        return full.index_copy_(-1, self.kept, logits)


def kept_ids(model_path: str, vocab: int, keep: int, always: set[int]) -> torch.Tensor:
    """Ids [0, keep) with the tokenizer's added tokens (chat markers, end of text) and `always`, ascending, padded
    with the ids after `keep` to a multiple of ROWS_MULTIPLE."""
    added: set[int] = set()
    tokenizer = Path(model_path) / "tokenizer.json"
    if tokenizer.exists():
        added = {int(token["id"]) for token in json.loads(tokenizer.read_text()).get("added_tokens", [])}
    ids = set(range(min(keep, vocab))) | {i for i in added | always if 0 <= i < vocab}
    following = iter(range(min(keep, vocab), vocab))
    while len(ids) % ROWS_MULTIPLE and len(ids) < vocab:  # whole blocks of rows for the int4 kernel
        ids.add(next(following))
    return torch.tensor(sorted(ids), dtype=torch.long)


def end_ids(model: torch.nn.Module) -> set[int]:
    """The model's own start and end-of-sequence ids (config and generation config): a draft must be able to
    propose an end (Qwen's start id, <|endoftext|>, ends text too)."""
    ids: set[int] = set()
    for config in (model.config, getattr(model, "generation_config", None)):
        for name in ("eos_token_id", "bos_token_id"):
            value = getattr(config, name, None) if config is not None else None
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return {int(i) for i in ids}


def trim_output_head(model: torch.nn.Module, model_path: str, keep: int) -> int:
    """Replaces the model's output head with a TrimmedHead over `keep` ids (see kept_ids); returns how many ids
    it computes, or 0 where it left the head whole (keep 0, or not below the vocabulary)."""
    head = model.get_output_embeddings()
    if keep <= 0 or not isinstance(head, torch.nn.Linear) or keep >= head.out_features:
        return 0
    if getattr(model.config, "final_logit_softcapping", None):  # tanh capping would turn -inf into a finite -cap
        raise ValueError(f"--vocab: {model.config.model_type} caps its logits after the head; run its draft whole")
    kept = kept_ids(model_path, head.out_features, keep, end_ids(model))
    if len(kept) >= head.out_features:
        return 0
    model.set_output_embeddings(TrimmedHead(head, kept))
    return len(kept)


def trimmed_rows(model: torch.nn.Module) -> int:
    """How many vocabulary rows a trimmed output head computes; 0 for a whole head."""
    head = model.get_output_embeddings()
    return len(head.kept) if isinstance(head, TrimmedHead) else 0


def kept_digest(model: torch.nn.Module) -> str:
    """Which ids a trimmed head computes, as a short digest ("" for a whole head): a quantised head's rows
    belong to exactly these ids (the tokenizer's added tokens and the end ids move them, not only N)."""
    head = model.get_output_embeddings()
    if not isinstance(head, TrimmedHead):
        return ""
    return hashlib.sha256(head.kept.cpu().numpy().tobytes()).hexdigest()[:16]
