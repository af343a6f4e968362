"""Draft and target must share one tokenizer: token ids cross between them unchanged."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TokenizerMismatch(ValueError):
    pass


def check_same_tokenizer(target: PreTrainedTokenizerBase, draft: PreTrainedTokenizerBase) -> None:
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if target_vocab == draft_vocab:
        return
    differing = sorted(t for t in target_vocab.keys() | draft_vocab.keys()
                       if target_vocab.get(t) != draft_vocab.get(t))
    raise TokenizerMismatch(
        f"the draft's tokenizer ({len(draft_vocab)} entries) differs from the target's ({len(target_vocab)}) "
        f"on {len(differing)} tokens, e.g. {differing[:3]}: speculation needs one shared vocabulary")
