"""A draft over part of the vocabulary (`--draft-vocab`, trimmed_head): its logits are the whole head's on the kept
ids and -inf elsewhere, it never proposes a cut id, its quantised form is kept and read back exactly, and the
router's output is target-only's token for token (the target still judges every draft on its whole vocabulary).

The draft's q was already a truncated distribution (its top-m ids, renormalised): a cut only narrows which ids
can be among them, so the rejection sampler's exactness tests (test_sampling.py) cover it unchanged."""

from __future__ import annotations

import pytest
import torch

from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.sampling import Sampling
from minedraft.engine.trimmed_head import ROWS_MULTIPLE, TrimmedHead, kept_ids, trimmed_rows
from services.draft.engine import DraftEngine
from tests.formats import FBGEMM
from tests.test_end_to_end import PROMPTS, run_all

KEEP = 64  # of the tiny pair's 320 ids: most of the target's tokens fall outside


def load(path, keep: int, quant: str = "none", cache=None) -> ModelRunner:
    return ModelRunner.load(str(path), dtype="float64" if quant == "none" else "float32", quant=quant, kv="static",
                            max_seqs=4, max_context=64, quant_cache=cache, draft_vocab=keep)


def prompt_logits(runner: ModelRunner) -> torch.Tensor:
    return runner.forward([SequenceState([3, 14, 15, 92, 65, 35, 89])], logits_to_keep=4)[0]


def test_kept_ids_logits_equal_the_whole_heads_and_the_rest_are_minus_inf(tiny_pair) -> None:
    whole, cut = load(tiny_pair[1], 0), load(tiny_pair[1], KEEP)
    head = cut.model.get_output_embeddings()
    assert isinstance(head, TrimmedHead) and trimmed_rows(cut.model) == len(head.kept) == ROWS_MULTIPLE
    kept = head.kept.tolist()
    assert kept == sorted(kept) and kept[:KEEP] == list(range(KEEP))  # the specials (ids 0-2) are among them
    assert cut.model.config.eos_token_id in kept
    expected, actual = prompt_logits(whole), prompt_logits(cut)
    assert actual.shape == expected.shape  # the whole vocabulary, as every consumer expects
    assert torch.allclose(actual[:, kept], expected[:, kept], rtol=0, atol=1e-12)
    dropped = torch.ones(actual.shape[-1], dtype=torch.bool)
    dropped[kept] = False
    assert torch.isneginf(actual[:, dropped]).all()
    assert trimmed_rows(load(tiny_pair[1], 10_000).model) == 0  # not below the vocabulary: left whole


def test_kept_ids_hold_the_added_and_end_tokens_padded_to_whole_blocks(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"added_tokens": [{"id": 300, "content": "<|im_end|>"}]}')
    kept = kept_ids(str(tmp_path), vocab=320, keep=10, always={310, 999}).tolist()
    assert kept == [*range(10 + ROWS_MULTIPLE - 12), 300, 310]  # 999: not in the vocabulary


def test_the_draft_never_proposes_a_cut_id_greedy_or_sampled(tiny_pair) -> None:
    engine = DraftEngine(load(tiny_pair[1], KEEP), top_m=8)
    kept = set(engine.runner.model.get_output_embeddings().kept.tolist())
    samplings = {"greedy": Sampling(), "sampled": Sampling(temperature=1.5, seed=7)}
    engine.prefill([(name, [200, 201, 250, 300, 310], s) for name, s in samplings.items()])
    proposals = engine.propose([(name, 5, [], 6) for name in samplings])
    for proposed in proposals:
        assert len(proposed) == 6
        for token in proposed:
            assert token.token_id in kept and set(token.support) <= kept
            assert abs(sum(token.probs) - 1) < 1e-9


@pytest.mark.parametrize("quant", ["int4", FBGEMM])
def test_a_cut_quantised_head_reads_back_bit_for_bit_and_apart_from_the_whole_one(tiny_pair, tmp_path,
                                                                                  quant: str) -> None:
    fresh = prompt_logits(load(tiny_pair[1], KEEP, quant))
    load(tiny_pair[1], KEEP, quant, tmp_path)
    whole = prompt_logits(load(tiny_pair[1], 0, quant, tmp_path))  # its own file: the cut one stays
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    read_back = load(tiny_pair[1], KEEP, quant, tmp_path)
    assert isinstance(read_back.model.get_output_embeddings(), TrimmedHead)
    assert torch.equal(prompt_logits(read_back), fresh)
    assert not torch.isneginf(whole).any() and torch.isneginf(fresh).any()


def acceptance(results: list) -> float:
    drafted = sum(int(r.stats["drafted_tokens"]) for r in results)
    return sum(int(r.stats["accepted_tokens"]) for r in results) / drafted


def test_a_cut_draft_changes_no_token_in_sd_or_psd(clusters, tiny_pair, tiny_clusters) -> None:
    expected = [r.token_ids for r in run_all(tiny_clusters["ar"], PROMPTS)]
    whole = acceptance(run_all(tiny_clusters["psd"], PROMPTS))
    for mode in ("sd", "psd"):
        results = run_all(clusters.get(mode, tiny_pair, max_batch=4, draft_vocab=KEEP), PROMPTS)
        assert [r.token_ids for r in results] == expected
        assert 0 < acceptance(results) < whole  # the cut took effect: the target's tokens past id 64 are missed


def test_a_tied_cut_head_and_changed_kept_ids_read_back_exactly(tiny_pair, tmp_path) -> None:
    """The default draft ties its head to its embedding; and the kept ids, not only their count, key the file."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from minedraft.models.tiny import tiny_config

    config = tiny_config(320)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    shutil.copy(tiny_pair[1] / "tokenizer.json", tmp_path / "tied")
    load(tmp_path / "tied", 60, "int4", tmp_path / "cache")
    read_back = load(tmp_path / "tied", 60, "int4", tmp_path / "cache")
    assert torch.equal(prompt_logits(read_back), prompt_logits(load(tmp_path / "tied", 60, "int4")))
    tokenizer = json.loads((tmp_path / "tied" / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][0], "id": 300, "content": "<|extra|>"})
    (tmp_path / "tied" / "tokenizer.json").write_text(json.dumps(tokenizer))
    moved = load(tmp_path / "tied", 60, "int4", tmp_path / "cache")  # 64 rows again, one of them id 300
    assert 300 in moved.model.get_output_embeddings().kept.tolist()
    assert torch.equal(prompt_logits(moved), prompt_logits(load(tmp_path / "tied", 60, "int4")))


def test_a_model_that_caps_its_logits_is_refused(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from minedraft.engine.trimmed_head import trim_output_head
    from minedraft.models.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(320, family="gemma2"))
    assert model.config.final_logit_softcapping
    with pytest.raises(ValueError, match="caps its logits"):
        trim_output_head(model, str(tmp_path), 64)
