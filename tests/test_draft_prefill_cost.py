"""What the draft's prefill of a new prompt costs each round of speculating: paid once per completion, so spread
over the tokens a completion makes (StageModel.draft_prefill_per_round), whatever the count of rounds run."""

import pytest

from services.router.stage_model import NATURAL_LENGTH_PRIOR, StageModel
from tests.test_policy import model


def test_a_prompts_prefill_is_spread_over_the_tokens_its_completion_makes() -> None:
    stages = model(lambda b: 5.0 + b, lambda b, k: 40.0 + 4 * b + 2 * k * b, alpha=0.8, verified_k=(0, 4))
    stages.asked = [512, 512]
    stages.observe_draft_prefill(0.0, prompts=1)  # one beside the target's prefill: free
    stages.observe_draft_prefill(270.0, prompts=1)
    per_prompt = 270.0 / (0.9 + 1)
    assert stages.completion_length == NATURAL_LENGTH_PRIOR, "asked 512: until one ends, the prior"
    assert stages.draft_prefill_per_round(4) == pytest.approx(
        per_prompt * stages.tokens_per_round(4) / NATURAL_LENGTH_PRIOR)

    def per_token(k: int) -> float:
        return stages.draft_prefill_per_round(k) / stages.tokens_per_round(k)

    for _ in range(200):
        stages.observe_round(4, 4)
    assert per_token(4) == pytest.approx(per_prompt / NATURAL_LENGTH_PRIOR), "rounds run do not dilute it"
    for _ in range(100):
        stages.completed(32, 512, natural=True, drafted=True)  # short answers: prefill over 32 tokens, not 512
    assert per_token(4) == pytest.approx(per_token(1)) == pytest.approx(per_prompt / 32, rel=1e-3)


def test_the_prefill_of_several_prompts_is_decayed_per_prompt() -> None:
    """A call caching three prompts ages what came before by three prompts, not one."""
    stages = StageModel()
    stages.observe_draft_prefill(500.0, prompts=1)
    stages.observe_draft_prefill(300.0, prompts=3)
    assert stages.prompts_prefilled == pytest.approx(0.9 ** 3 + 3)
    assert stages.prompt_prefill_ms == pytest.approx(0.9 ** 3 * 500.0 + 300.0)


def test_completions_cut_at_max_tokens_say_only_what_they_asked() -> None:
    """A warm-up of answers of 4 tokens (all they asked) must not price the prompts asking 64 after it at 4 tokens,
    nor does a completion cut at max_tokens say how long answers run on their own."""
    stages = StageModel(asked=[4, 4])
    stages.completed(4, 4, natural=False, drafted=True)
    assert stages.completion_length == 4.0
    stages.asked = [64, 64]
    assert stages.completion_length == 64.0
    for _ in range(40):
        stages.completed(64, 64, natural=False, drafted=True)
    assert stages.completion_length == 64.0


def test_answers_that_end_on_their_own_set_the_length_and_one_long_ask_moves_only_its_own() -> None:
    stages = StageModel(asked=[256] * 15)
    for _ in range(60):
        stages.completed(150, 256, natural=True, drafted=False)  # target-only completions count too
    assert stages.completion_length == pytest.approx(150.0, rel=0.01)
    stages.asked.append(32000)
    stages.completed(300, 32000, natural=True, drafted=True)  # an agent that asked for the whole context
    assert 150.0 < stages.completion_length < 170.0, "one more answer of 300, not 0.05 of 256 (a share of the ask)"
