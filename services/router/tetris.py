"""Batch-wide draft selection (TETRIS, after the MineDraft authors' `select_proposals_no_priority`).

The draft proposes k + e tokens per sequence; the lane keeps only its `capacity` (k × lane size) best draft
positions, so the verify batch feeds the target no more tokens than plain k would, spent where acceptance is
likeliest. Selection only shortens proposals; a sequence left with no positions is verified without drafts and
still gets the target's own token.

How positions are scored decides whether that stays lossless. The seed ranks position i by the draft's
cumulative log-probability of x_1..x_i. Under sampling that makes the cut at i depend on the token x_i drawn
there: unlikely draws get dropped and the target then samples afresh, which biases the output (a total
variation of 0.08 in tests/test_tetris.py's power check). Here position i scores
log q(x_1..x_{i-1}) + log max q_i: the prefix before it, and the draft's confidence at i, which does not depend
on which token was drawn. Under greedy decoding x_i is the argmax, so the two scores are the same; under
sampling the decision to verify position i never looks at x_i, and rejection sampling stays exact. Scores never
rise along a sequence, so the kept positions form a prefix of each.
"""

from __future__ import annotations

import math

from minedraft.protos import common_pb2

Proposals = dict[str, list[common_pb2.DraftToken]]


def position_scores(tokens: list[common_pb2.DraftToken], greedy: bool) -> list[float]:
    """Each position's score: the log-probability of the drafted prefix before it plus log max q there.

    Needs DraftToken.logprob (a Propose with_logprobs): log q(x) when sampling; for greedy drafts, the
    log-probability of the argmax, which is also the largest."""
    scores, prefix = [], 0.0
    for token in tokens:
        confidence = token.logprob if greedy else math.log(max(token.q.probs))
        scores.append(prefix + confidence)
        prefix += token.logprob
    return scores


def select(proposals: Proposals, scores: dict[str, list[float]], capacity: int) -> Proposals:
    """Each sequence's proposal cut to its positions among the lane's `capacity` best scores (ties: earlier
    positions, then sequences in order)."""
    ranked = sorted((-score, position, order, seq_id)
                    for order, seq_id in enumerate(proposals) for position, score in enumerate(scores[seq_id]))
    kept = dict.fromkeys(proposals, 0)
    for _, position, _, seq_id in ranked[:max(capacity, 0)]:
        kept[seq_id] = max(kept[seq_id], position + 1)
    return {seq_id: tokens[:kept[seq_id]] for seq_id, tokens in proposals.items()}
