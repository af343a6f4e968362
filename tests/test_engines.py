"""Draft and target engines: batching must not change any sequence's result, greedy or sampled."""

import pytest

from minedraft.errors import InvalidArgument, NotFound
from minedraft.model_runner import ModelRunner
from minedraft.sampling import Sampling
from services.draft.engine import DraftEngine
from services.target.engine import TargetEngine

PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [20, 21], "c": [30, 31, 32, 33, 34]}
SAMPLINGS = {"a": Sampling(), "b": Sampling(temperature=0.8, top_k=20, seed=3),
             "c": Sampling(temperature=1.1, top_p=0.9, seed=4)}


def speculate(target: TargetEngine, draft: DraftEngine, seq_ids: list[str], rounds: int,
              batched: bool) -> dict[str, list[int]]:
    """Runs a few draft/verify rounds, the way the router does, batched or one sequence at a time."""
    groups = [seq_ids] if batched else [[s] for s in seq_ids]
    out: dict[str, list[int]] = {}
    for group in groups:
        draft.prefill([(s, PROMPTS[s], SAMPLINGS[s]) for s in group])
        firsts = target.prefill([(s, PROMPTS[s], SAMPLINGS[s]) for s in group])
        tokens = {s: [*PROMPTS[s], t] for s, t in zip(group, firsts, strict=True)}
        draft_len = {s: len(PROMPTS[s]) for s in group}
        for _ in range(rounds):
            proposals = draft.propose([(s, draft_len[s], tokens[s][draft_len[s]:], 3) for s in group])
            drafts = [[(p.token_id, p.support, p.probs) for p in props] for props in proposals]
            verdicts = target.verify(list(zip(group, drafts, strict=True)))
            for s, d, (accepted, nxt) in zip(group, drafts, verdicts, strict=True):
                draft_len[s] = len(tokens[s]) + accepted
                tokens[s] += [t for t, _, _ in d[:accepted]] + [nxt]
        out.update(tokens)
        target.release(group)
        draft.release(group)
    return out


@pytest.fixture
def engines(tiny_pair):
    target_path, draft_path = tiny_pair
    return (TargetEngine(ModelRunner.load(str(target_path), dtype="float64")),
            DraftEngine(ModelRunner.load(str(draft_path), dtype="float64"), top_m=8))


def test_batched_rounds_equal_one_sequence_at_a_time(engines) -> None:
    target, draft = engines
    batched = speculate(target, draft, list(PROMPTS), rounds=6, batched=True)
    single = speculate(target, draft, list(PROMPTS), rounds=6, batched=False)
    assert batched == single
    assert len(target.table) == 0 and len(draft.table) == 0


def test_verify_without_drafts_is_plain_decoding(engines) -> None:
    target, _ = engines
    first = target.prefill([("x", PROMPTS["a"], Sampling())])[0]
    assert target.verify([("x", [])]) == [(0, target.table.get("x").tokens[-1])]
    assert target.table.get("x").tokens[len(PROMPTS["a"])] == first


def test_bad_calls_raise_clear_errors(engines) -> None:
    target, draft = engines
    with pytest.raises(NotFound):
        target.verify([("missing", [])])
    with pytest.raises(InvalidArgument):
        target.prefill([("x", [10**9], Sampling())])
    with pytest.raises(InvalidArgument):
        target.prefill([("x", [1], Sampling()), ("x", [2], Sampling())])
    draft.prefill([("y", [1, 2, 3], Sampling())])
    with pytest.raises(InvalidArgument):
        draft.propose([("y", 99, [], 2)])
    assert draft.table.get("y").tokens == [1, 2, 3]  # a rejected call changes nothing
