"""Penalties, min_p, min_tokens, logprobs and shared prompts: speculation must change none of them."""

import pytest
import torch

from minedraft.engine.logits_processing import adjust
from minedraft.engine.model_runner import ModelRunner
from minedraft.engine.sampling import (
    DRAFT_STREAM,
    TARGET_STREAM,
    Sampling,
    make_generator,
    sample_truncated,
    warp,
)
from minedraft.engine.verification import verify_sampled
from services.draft.engine import DraftEngine
from services.target.engine import TargetEngine
from tests.test_sampling import total_variation

VOCAB, K, TRIALS = 8, 2, 20000
PROMPT = [3, 5, 3]
PENALISED = Sampling(temperature=1.0, min_p=0.05, repetition_penalty=1.6, frequency_penalty=0.7,
                     presence_penalty=0.5, min_tokens=1, held_tokens=(0,), prompt_len=len(PROMPT))


def target_row(logits: torch.Tensor, history: list[int], sampling: Sampling) -> torch.Tensor:
    """What plain decoding samples from after `history`."""
    return warp(adjust(logits[None], sampling, history, len(history)), sampling)[0]


def test_penalised_speculation_follows_penalised_target_distribution() -> None:
    torch.manual_seed(2)
    target_logits = torch.randn(K + 1, VOCAB, dtype=torch.float64) * 1.5
    draft_logits = target_logits[:K] + torch.randn(K, VOCAB, dtype=torch.float64)
    draft_gen, target_gen = make_generator(9, DRAFT_STREAM), make_generator(9, TARGET_STREAM)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(TRIALS):
        tokens, drafted = list(PROMPT), []
        for i in range(K):  # the draft samples with the same history-dependent adjustments
            row = adjust(draft_logits[i][None], PENALISED, tokens, len(tokens))[0]
            drafted.append(sample_truncated(row, PENALISED, top_m=4, generator=draft_gen))
            tokens.append(drafted[-1][0])
        probs = warp(adjust(target_logits, PENALISED, tokens, len(PROMPT)), PENALISED)
        accepted, nxt = verify_sampled(probs, [d[0] for d in drafted], [(d[1], d[2]) for d in drafted], target_gen)
        emitted = [*[d[0] for d in drafted[:accepted]], nxt]
        if len(emitted) == 1:  # the next round's first token: the target's own step after the correction
            row = target_row(target_logits[1], [*PROMPT, nxt], PENALISED)
            emitted.append(int(torch.multinomial(row, 1, generator=target_gen)))
        first[emitted[0]] += 1
        second[emitted[1]] += 1
    p0 = target_row(target_logits[0], PROMPT, PENALISED)
    # The second token's marginal: the penalties after each possible first token.
    p1 = sum(p0[x] * target_row(target_logits[1], [*PROMPT, x], PENALISED) for x in range(VOCAB))
    assert float(p0[0]) == 0.0 and first[0] == 0, "min_tokens keeps the held token out of the first position"
    assert total_variation(first, p0) < 0.015
    assert total_variation(second, p1) < 0.025
    plain = Sampling(temperature=1.0)
    unpenalised = sum(target_row(target_logits[0], PROMPT, plain)[x] * target_row(target_logits[1], [*PROMPT, x],
                                                                                  plain) for x in range(VOCAB))
    assert total_variation(second, unpenalised) > 0.05, "the test must tell penalised from plain sampling"


def test_penalties_follow_vllm_semantics() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    s = Sampling(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5, prompt_len=1)
    out = adjust(logits, s, [0, 1, 1], first=3)  # token 0 in the prompt; token 1 twice in the output
    assert out.tolist() == [[1.0, -2.0 - 0.5 - 0.5, 0.5, 0.0]]


@pytest.fixture(scope="module")
def engines(tiny_pair):
    target_path, draft_path = tiny_pair
    return (TargetEngine(ModelRunner.load(str(target_path), dtype="float64")),
            DraftEngine(ModelRunner.load(str(draft_path), dtype="float64"), top_m=8))


def decode(target: TargetEngine, draft: DraftEngine | None, sampling: Sampling, steps: int) -> tuple[list, list]:
    """Tokens and their logprobs after `steps` rounds, speculative (k=3) with a draft, else plain."""
    first = target.prefill([("s", PROMPT, sampling)])[0]
    tokens, logprobs = [*PROMPT, first.next_token], list(first.logprobs)
    if draft:
        draft.prefill([("s", PROMPT, sampling)])
    held = len(PROMPT)
    for _ in range(steps):
        drafts = []
        if draft:
            (proposal,) = draft.propose([("s", held, tokens[held:], 3)])
            drafts = [(p.token_id, p.support, p.probs) for p in proposal]
        (verdict,) = target.verify([("s", drafts)])
        held = len(tokens) + verdict.accepted
        tokens += [d[0] for d in drafts[:verdict.accepted]] + [verdict.next_token]
        logprobs += verdict.logprobs
    target.release(["s"])
    if draft:
        draft.release(["s"])
    return tokens[:len(PROMPT) + steps + 1], logprobs[:steps + 1]


@pytest.mark.parametrize("sampling", [
    Sampling(logprobs=3), Sampling(logprobs=2, repetition_penalty=1.8, frequency_penalty=1.0, presence_penalty=0.5,
                                   min_tokens=3, held_tokens=(7, 9), prompt_len=len(PROMPT))],
    ids=["greedy", "greedy-penalised"])
def test_greedy_tokens_and_logprobs_equal_plain_decoding(engines, sampling: Sampling) -> None:
    target, draft = engines
    plain_tokens, plain_logprobs = decode(target, None, sampling, steps=10)
    spec_tokens, spec_logprobs = decode(target, draft, sampling, steps=10)
    assert spec_tokens == plain_tokens
    assert [lp.token for lp in spec_logprobs] == plain_tokens[len(PROMPT):]
    for spec, plain in zip(spec_logprobs, plain_logprobs, strict=True):
        assert spec.top_ids == plain.top_ids and len(spec.top_ids) == sampling.logprobs
        assert spec.logprob == pytest.approx(plain.logprob, abs=1e-6)
        assert spec.top_logprobs == pytest.approx(plain.top_logprobs, abs=1e-6)
    # Independently: the model's own log-softmax over the whole sequence, with the same penalties.
    with torch.inference_mode():
        logits = target.runner.model(torch.tensor([plain_tokens])).logits[0, len(PROMPT) - 1:-1]
    expected = adjust(logits, sampling, plain_tokens, len(PROMPT)).log_softmax(-1)
    for i, lp in enumerate(plain_logprobs):
        assert lp.logprob == pytest.approx(float(expected[i, lp.token]), abs=1e-6)
    if sampling.min_tokens:
        assert not set(plain_tokens[len(PROMPT):len(PROMPT) + 3]) & {7, 9}


def test_penalties_change_greedy_output(engines) -> None:
    target, _ = engines
    plain, _ = decode(target, None, Sampling(), steps=10)
    penalised, _ = decode(target, None, Sampling(repetition_penalty=3.0, prompt_len=len(PROMPT)), steps=10)
    assert plain != penalised


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_a_shared_prompt_samples_as_if_run_alone(tiny_pair, kv: str) -> None:
    target = TargetEngine(ModelRunner.load(str(tiny_pair[0]), dtype="float64", kv=kv, max_seqs=4, max_context=64))
    samplings = [Sampling(temperature=1.0, seed=seed, logprobs=1) for seed in (1, 2, 3)]
    ids = ["a", "b", "c"]
    shared = target.prefill([(i, PROMPT, s) for i, s in zip(ids, samplings, strict=True)],
                            same_prompt_as={"b": "a", "c": "a"})
    shared_next = target.verify([(i, []) for i in ids])
    target.release(ids)
    for i, s, first, verdict in zip(ids, samplings, shared, shared_next, strict=True):
        (alone,) = target.prefill([(i, PROMPT, s)])
        assert alone.next_token == first.next_token
        assert alone.logprobs[0].logprob == pytest.approx(first.logprobs[0].logprob, abs=1e-9)
        assert target.verify([(i, [])])[0].next_token == verdict.next_token  # the copied cache serves on
        target.release([i])
