"""TETRIS batch-wide draft selection: what it keeps, and that it never changes the output."""

from __future__ import annotations

import math

import pytest
import torch

from minedraft.engine import sampling as sampler
from minedraft.engine.model_runner import ModelRunner
from minedraft.engine.sampling import Sampling
from minedraft.engine.verification import verify_sampled
from minedraft.protos import common_pb2
from services.draft.engine import DraftEngine
from services.router.tetris import position_scores, select
from tests.test_end_to_end import PROMPTS, run_all
from tests.test_sampling import total_variation


def token(logprob: float, q: list[float] | None = None) -> common_pb2.DraftToken:
    q = q or [1.0]
    return common_pb2.DraftToken(token_id=len(q) - 1, logprob=logprob,
                                 q=common_pb2.SparseDist(token_ids=list(range(len(q))), probs=q))


def test_the_best_positions_lane_wide_are_kept_as_prefixes() -> None:
    proposals = {"sure": [token(-0.1), token(-0.1), token(-0.1)], "unsure": [token(-2.0), token(-0.1), token(-0.1)]}
    scores = {s: position_scores(tokens, greedy=True) for s, tokens in proposals.items()}
    assert scores["sure"] == pytest.approx([-0.1, -0.2, -0.3]) and scores["unsure"][0] == -2.0
    kept = select(proposals, scores, capacity=4)
    assert [len(kept["sure"]), len(kept["unsure"])] == [3, 1]
    kept = select(proposals, scores, capacity=2)  # smaller than the lane's k x size: one sequence gets nothing
    assert [len(kept["sure"]), len(kept["unsure"])] == [2, 0]
    assert sum(map(len, select(proposals, scores, capacity=100).values())) == 6
    assert select(proposals, scores, capacity=0) == {"sure": [], "unsure": []}


def test_ties_go_to_earlier_positions_then_earlier_sequences() -> None:
    proposals = {"a": [token(0.0), token(0.0)], "b": [token(0.0), token(0.0)]}
    scores = {s: position_scores(tokens, greedy=True) for s, tokens in proposals.items()}
    kept = select(proposals, scores, capacity=3)
    assert [len(kept["a"]), len(kept["b"])] == [2, 1]


def test_sampled_positions_are_scored_without_the_token_drawn_there() -> None:
    drawn = token(math.log(0.1), q=[0.7, 0.2, 0.1])  # an unlikely draw: its own probability is not its score
    assert position_scores([drawn, drawn], greedy=False) == pytest.approx([math.log(0.7),
                                                                         math.log(0.1) + math.log(0.7)])


def first_token_distance(lossless: bool, trials: int = 12000) -> float:
    """A lane of two: A's first draft competes with B's; returns the TV of A's first output token from p."""
    torch.manual_seed(3)
    sampling = Sampling(temperature=1.0)
    target = torch.randn(3, 8, dtype=torch.float64) * 1.5
    drafts = {"a": target[:2] + torch.randn(2, 8, dtype=torch.float64) * 1.5,
              "b": torch.randn(2, 8, dtype=torch.float64) * 3}
    p = sampler.warp(target, sampling)
    draft_gen = sampler.make_generator(5, sampler.DRAFT_STREAM)
    target_gen = sampler.make_generator(5, sampler.TARGET_STREAM)
    counts = torch.zeros(8)
    for _ in range(trials):
        drawn = {s: [sampler.sample_truncated(logits[i], sampling, 8, draft_gen) for i in range(2)]
                 for s, logits in drafts.items()}
        proposals = {s: [common_pb2.DraftToken(token_id=t, logprob=math.log(q[ids.index(t)]),
                                               q=common_pb2.SparseDist(token_ids=ids, probs=q)) for t, ids, q in d]
                     for s, d in drawn.items()}
        if lossless:
            scores = {s: position_scores(tokens, greedy=False) for s, tokens in proposals.items()}
        else:  # the seed's: the cumulative log-probability including the token drawn at the position
            scores = {s: list(torch.tensor([t.logprob for t in tokens]).cumsum(0).tolist())
                      for s, tokens in proposals.items()}
        kept = select(proposals, scores, capacity=2)["a"]
        accepted, nxt = verify_sampled(p, [t.token_id for t in kept],
                                       [(list(t.q.token_ids), list(t.q.probs)) for t in kept], target_gen)
        counts[kept[0].token_id if accepted else nxt] += 1
    return total_variation(counts, p[0])


def test_sampled_output_keeps_the_target_distribution() -> None:
    assert first_token_distance(lossless=True) < 0.02


def test_the_seeds_scoring_would_be_caught() -> None:
    """Power check: ranking by the drawn token's own probability biases the output."""
    assert first_token_distance(lossless=False) > 0.05


def test_the_draft_reports_its_log_probabilities(tiny_pair) -> None:
    draft = DraftEngine(ModelRunner.load(str(tiny_pair[1]), dtype="float64"), top_m=8)
    for seq_id, sampling in (("greedy", Sampling()), ("sampled", Sampling(temperature=0.8, seed=1))):
        draft.prefill([(seq_id, [5, 6, 7], sampling)])
        (proposal,) = draft.propose([(seq_id, 3, [], 3)], with_logprobs=True)
        with torch.inference_mode():
            logits = draft.runner.model(torch.tensor([[5, 6, 7, *[t.token_id for t in proposal[:-1]]]])).logits[0]
        for i, drafted in enumerate(proposal):
            if sampling.greedy:
                expected = float(logits[2 + i].log_softmax(-1)[drafted.token_id])
            else:
                expected = math.log(drafted.probs[drafted.support.index(drafted.token_id)])
            assert math.isclose(drafted.logprob, expected, abs_tol=1e-5)  # reported in float32


def test_greedy_output_with_tetris_equals_target_only(clusters, tiny_pair, tiny_clusters) -> None:
    tetris = clusters.get("psd", tiny_pair, max_batch=4, tetris_extra=3)
    with_tetris = run_all(tetris, PROMPTS)
    assert [r.token_ids for r in with_tetris] == [r.token_ids for r in run_all(tiny_clusters["ar"], PROMPTS)]
    drafted = sum(int(r.stats["drafted_tokens"]) for r in with_tetris)
    accepted = sum(int(r.stats["accepted_tokens"]) for r in with_tetris)
    assert 0 < accepted < drafted
