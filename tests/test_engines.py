"""Draft and target engines: batching must not change any sequence's result, greedy or sampled."""

import math

import pytest

from minedraft.engine.model_runner import ModelRunner
from minedraft.engine.sampling import Sampling
from minedraft.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from services.draft.engine import DraftEngine
from services.target.engine import TargetEngine, Verdict

PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [20, 21], "c": [30, 31, 32, 33, 34], "d": [40, 41, 40, 42]}
SAMPLINGS = {"a": Sampling(), "b": Sampling(temperature=0.8, top_k=20, seed=3),
             "c": Sampling(temperature=1.1, top_p=0.9, seed=4),
             "d": Sampling(temperature=0.9, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.4,
                           presence_penalty=0.2, min_tokens=4, held_tokens=(1, 2, 3), prompt_len=4, seed=5)}


def speculate(target: TargetEngine, draft: DraftEngine, seq_ids: list[str], rounds: int,
              batched: bool, poison: bool = False) -> dict[str, list[int]]:
    """Runs a few draft/verify rounds, the way the router does, batched or one sequence at a time.

    `poison`: every call also carries a sequence that fails (a bad token, an unknown id, bad drafts)."""
    groups = [seq_ids] if batched else [[s] for s in seq_ids]
    out: dict[str, list[int]] = {}
    bad = [("bad", [10**9], Sampling()), ("held", [1, 2], Sampling())] if poison else []
    for group in groups:
        draft.prefill([*bad, *((s, PROMPTS[s], SAMPLINGS[s]) for s in group)])
        firsts = target.prefill([*((s, PROMPTS[s], SAMPLINGS[s]) for s in group), *bad])[:len(group)]
        tokens = {s: [*PROMPTS[s], t.next_token] for s, t in zip(group, firsts, strict=True)}
        draft_len = {s: len(PROMPTS[s]) for s in group}
        for _ in range(rounds):
            bad_propose = [("bad", 0, [1], 3)] if poison else []
            proposals = draft.propose([(s, draft_len[s], tokens[s][draft_len[s]:], 3) for s in group] + bad_propose)
            drafts = [[(p.token_id, p.support, p.probs) for p in props] for props in proposals[:len(group)]]
            bad_verify = [("held", [(1, [2], [1.0])]), ("bad", [])] if poison else []  # malformed; unknown
            verdicts = target.verify([*bad_verify, *zip(group, drafts, strict=True)])[len(bad_verify):]
            for s, d, verdict in zip(group, drafts, verdicts, strict=True):
                draft_len[s] = len(tokens[s]) + verdict.accepted
                tokens[s] += [t for t, _, _ in d[:verdict.accepted]] + [verdict.next_token]
        out.update(tokens)
        target.release([*group, "held"])
        draft.release([*group, "held"])
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
    assert target.verify([("x", [])]) == [Verdict(0, target.table.get("x").tokens[-1])]
    assert target.table.get("x").tokens[len(PROMPTS["a"])] == first.next_token


def test_bad_calls_fail_alone_and_change_nothing(engines) -> None:
    target, draft = engines
    (missing,) = target.verify([("missing", [])])
    assert isinstance(missing, NotFound)
    bad, good = target.prefill([("x", [10**9], Sampling()), ("z", [1, 2], Sampling())])
    assert isinstance(bad, InvalidArgument) and isinstance(good, Verdict) and "x" not in target.table
    with pytest.raises(InvalidArgument):  # an id twice: no result could be told apart
        target.prefill([("x", [1], Sampling()), ("x", [2], Sampling())])
    assert isinstance(target.prefill([("z", [3], Sampling())])[0], AlreadyExists)  # never silently replaced
    assert isinstance(target.prefill([("w" * 200, [3], Sampling())])[0], InvalidArgument)
    assert isinstance(target.prefill([("t", [3], Sampling(temperature=1e-30))])[0], InvalidArgument)
    held = list(target.table.get("z").tokens)
    too_many = [(1, [1], [1.0])] * (target.max_drafts + 1)
    for drafts in (too_many, [(1, [2], [1.0])], [(1, [-5, 1], [0.5, 0.5])], [(1, [1], [float("nan")])]):
        (result,) = target.verify([("z", drafts)])
        assert isinstance(result, InvalidArgument)
    assert target.table.get("z").tokens == held
    draft.prefill([("y", [1, 2, 3], Sampling())])
    for call in (("y", 99, [], 2), ("y", 3, [], draft.max_k + 1), ("y", 3, [10**9], 2)):
        (result,) = draft.propose([call])
        assert isinstance(result, InvalidArgument)
    assert draft.table.get("y").tokens == [1, 2, 3]  # a rejected call changes nothing


def test_other_owners_sequences_are_out_of_reach(engines) -> None:
    target, draft = engines
    target.prefill([("s", [1, 2], Sampling())], owner="router-a")
    assert isinstance(target.verify([("s", [])], owner="router-b")[0], NotFound)
    assert target.release(["s"], owner="router-b") == 0
    assert isinstance(target.prefill([("s", [3], Sampling())], owner="router-b")[0], AlreadyExists)
    draft.prefill([("s", [1, 2], Sampling())], owner="router-a")
    assert draft.prefill([("s", [4, 5], Sampling())], owner="router-a", replace=frozenset({"s"})) == [None]
    assert draft.table.get("s", "router-a").tokens == [4, 5]
    assert draft.prefill([("s", [6], Sampling())], owner="router-b", replace=frozenset({"s"}))[0].code == \
        AlreadyExists.code


def test_bad_batch_mates_change_no_token(engines) -> None:
    """Every call carries a poisoned sequence beside the good ones: their tokens equal a clean run's."""
    target, draft = engines
    clean = speculate(target, draft, list(PROMPTS), rounds=5, batched=True)
    poisoned = speculate(target, draft, list(PROMPTS), rounds=5, batched=True, poison=True)
    assert poisoned == clean
    assert len(target.table) == 0 and len(draft.table) == 0


def test_past_the_sequence_cap_a_newcomer_is_refused(tiny_pair) -> None:
    target = TargetEngine(ModelRunner.load(str(tiny_pair[0]), dtype="float64"), max_sequences=2)
    results = target.prefill([(s, [1, 2], Sampling()) for s in "abc"])
    assert isinstance(results[2], ResourceExhausted) and all(isinstance(r, Verdict) for r in results[:2])
    target.release(["a"])
    assert isinstance(target.prefill([("c", [1, 2], Sampling())])[0], Verdict)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8, seed=3)])
def test_drafting_stops_after_a_token_the_draft_found_unlikely(engines, sampling: Sampling) -> None:
    """stop_below cuts a proposal right after its first token under the threshold, and changes no token."""
    _, draft = engines
    prompt = PROMPTS["a"]

    def proposal(stop_below: float) -> list:
        draft.prefill([("s", prompt, sampling)])
        (tokens,) = draft.propose([("s", len(prompt), [], 8)], with_logprobs=True, stop_below=stop_below)
        draft.release(["s"])
        return tokens

    full = proposal(0.0)
    probs = [math.exp(t.logprob) for t in full]  # greedy: the softmax at temperature 1; sampled: q(token)
    low, high = sorted(probs)[len(probs) // 2 - 1:len(probs) // 2 + 1]
    threshold = (low + high) / 2  # some tokens fall under it, some not, none near it
    cut = next(i for i, p in enumerate(probs) if p < threshold) + 1
    assert [t.token_id for t in proposal(threshold)] == [t.token_id for t in full[:cut]]
    assert len(proposal(1.01)) == 1 and len(full) == 8  # always one draft; without a threshold, all k
