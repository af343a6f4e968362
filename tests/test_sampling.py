"""The verifier's output must be distributed exactly as the target's own sampling."""

import pytest
import torch

from minedraft.engine.sampling import (
    DRAFT_STREAM,
    TARGET_STREAM,
    Sampling,
    make_generator,
    sample_truncated,
    warp,
)
from minedraft.engine.verification import verify_greedy, verify_sampled

VOCAB, K, TRIALS = 8, 2, 20000


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=5), Sampling(temperature=1.3, top_p=0.8),
     Sampling(temperature=0.9, top_k=6, top_p=0.9)],
    ids=["plain", "top_k", "top_p", "top_k_top_p"],
)
def test_verified_tokens_follow_target_distribution(sampling: Sampling) -> None:
    torch.manual_seed(1)
    target_logits = torch.randn(K + 1, VOCAB, dtype=torch.float64) * 1.5
    draft_logits = target_logits[:K] + torch.randn(K, VOCAB, dtype=torch.float64)  # a draft that disagrees
    p = warp(target_logits, sampling)
    draft_gen, target_gen = make_generator(7, DRAFT_STREAM), make_generator(7, TARGET_STREAM)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    accepted_total = 0
    for _ in range(TRIALS):
        drafted = [sample_truncated(draft_logits[i], sampling, top_m=4, generator=draft_gen) for i in range(K)]
        drafts = [d[0] for d in drafted]
        accepted, nxt = verify_sampled(p, drafts, [(d[1], d[2]) for d in drafted], target_gen)
        emitted = [*drafts[:accepted], nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
        accepted_total += accepted
    assert 0 < accepted_total < TRIALS * K, "the test needs both acceptances and rejections"
    assert total_variation(first, p[0]) < 0.015
    assert total_variation(second, p[1]) < 0.025


def test_naive_acceptance_would_be_caught() -> None:
    """Sanity check of the test's power: always accepting the draft is visibly biased."""
    torch.manual_seed(1)
    sampling = Sampling(temperature=1.0)
    target_logits = torch.randn(1, VOCAB, dtype=torch.float64) * 1.5
    draft_logits = target_logits + torch.randn(1, VOCAB, dtype=torch.float64)
    gen = make_generator(3, DRAFT_STREAM)
    counts = torch.zeros(VOCAB)
    for _ in range(TRIALS // 4):
        counts[sample_truncated(draft_logits[0], sampling, top_m=4, generator=gen)[0]] += 1
    assert total_variation(counts, warp(target_logits, sampling)[0]) > 0.05


def test_truncated_draft_support_is_sparse_and_normalised() -> None:
    logits = torch.randn(1000, dtype=torch.float64)
    token, ids, probs = sample_truncated(logits, Sampling(temperature=1.0), 32, make_generator(1, DRAFT_STREAM))
    assert len(ids) == 32 and token in ids
    assert abs(sum(probs) - 1.0) < 1e-9
    assert set(ids) == set(torch.topk(logits, 32).indices.tolist())


def test_greedy_verification_keeps_matching_prefix() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 1, 4, 1]):
        logits[row, best] = 5.0
    assert verify_greedy(logits, [3, 1, 4]) == (3, 1)
    assert verify_greedy(logits, [3, 2, 4]) == (1, 1)
    assert verify_greedy(logits, [0, 1, 4]) == (0, 3)
    assert verify_greedy(logits[:1], []) == (0, 3)


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    probs = warp(logits, Sampling(temperature=1.0, top_p=0.75))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    probs = warp(logits, Sampling(temperature=1.0, top_k=1))
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]
