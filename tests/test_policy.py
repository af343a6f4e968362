"""The lane policy on synthetic stage times: it must pick the right regime at both ends (services/router/policy.py)."""

import itertools
import random

import pytest

from services.router.policy import (
    PRIOR_DROP_GAIN,
    Plan,
    best_plan,
    next_plan,
    predicted_rate,
    rebalance,
    tokens_per_round,
)
from services.router.stage_costs import LinearCost, VerifyCost
from services.router.stage_model import StageModel


def model(draft_step, verify, alpha: float, batches=(1, 2, 4, 8, 16, 32), verified_k=(4,)) -> StageModel:
    """Stage times from functions of the batch (and, for verify, the draft length)."""
    stages = StageModel()
    for b in batches:
        stages.observe_propose(b, 4, 4 * draft_step(b))
        for k in verified_k:
            stages.observe_verify(b, k, verify(b, k))
    stages.observe_acceptance(1000, round(1000 * alpha))
    draws = random.Random(0)  # rounds of 8 drafts, each accepted with probability alpha until the first miss
    for _ in range(2000):
        stages.observe_round(8, next((i for i in range(8) if draws.random() >= alpha), 8))
    return stages


def test_linear_cost_recovers_intercept_and_slope() -> None:
    cost = LinearCost()
    for b in (1, 2, 4, 8):
        cost.observe(b, 3.0 + 0.5 * b)
    assert cost(16) == pytest.approx(11.0)
    assert not LinearCost().known


def test_launch_bound_small_batches_use_one_lane() -> None:
    # A forward costs the same at any batch size: splitting only doubles the number of forwards.
    plan = best_plan(model(lambda b: 10.0, lambda b, k: 50.0, alpha=0.8), sequences=2, k_max=8)
    assert plan.lanes == 1 and plan.k > 0


def test_compute_bound_large_batches_use_two_lanes() -> None:
    # Cost grows with the batch: half-size forwards in two overlapped lanes approach 2x.
    plan = best_plan(model(lambda b: 2.0 * b, lambda b, k: 12.0 * b, alpha=0.8), sequences=32, k_max=8)
    assert plan.lanes == 2


def test_k_follows_acceptance() -> None:
    stages = lambda alpha: model(lambda b: 5.0 + b, lambda b, k: 40.0 + 4 * b, alpha)  # noqa: E731
    high, low = best_plan(stages(0.95), 8, k_max=8), best_plan(stages(0.05), 8, k_max=8)
    assert high.k > low.k
    assert low.k == 0, "a draft that is almost never right is not worth running"


def test_two_lane_k_fills_but_does_not_exceed_the_verify_time() -> None:
    stages = model(lambda b: 2.0 * b, lambda b, k: 40.0 * b, alpha=0.99)
    plan = best_plan(stages, 16, k_max=32)
    assert plan.lanes == 2
    assert plan.k * stages.draft_step(8) <= stages.verify(8, plan.k) * 1.05 + stages.draft_step(8)


def test_tokens_per_round_and_rebalance() -> None:
    assert tokens_per_round(0.0, 4) == 1.0 and tokens_per_round(1.0, 4) == 5.0
    assert tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert rebalance([5, 1]) == 2 and rebalance([3, 3]) == 0 and rebalance([1, 0]) == 0


def test_layout_holds_for_one_sequence_and_small_gains() -> None:
    stages = model(lambda b: 2.0 * b, lambda b, k: 12.0 * b, alpha=0.8)  # two lanes win at 32
    two = best_plan(stages, 32, k_max=8)
    assert two.lanes == 2
    assert next_plan(stages, two, sequences=1, k_max=8).lanes == 2, "one sequence: no reason to switch"
    assert next_plan(stages, Plan(1, 4, 0.0), sequences=32, k_max=8).lanes == 2, "a clear gain switches"
    flat = model(lambda b: 10.0, lambda b, k: 50.0, alpha=0.8)
    one = best_plan(flat, 2, k_max=8)
    assert one.lanes == 1 and next_plan(flat, one, sequences=2, k_max=8) == one


def test_acceptance_prior_damps_early_samples() -> None:
    stages = StageModel()
    stages.observe_acceptance(4, 4)
    assert 0.7 < stages.alpha < 0.8


def test_one_sequence_under_two_lanes_still_drafts() -> None:
    stages = model(lambda b: 10.0 + b, lambda b, k: 60.0 + 5 * b, alpha=0.8)
    plan = next_plan(stages, Plan(2, 4, 0.0), sequences=1, k_max=8)
    assert plan.lanes == 2 and plan.k > 0


def test_bursty_acceptance_is_valued_by_its_measured_survival() -> None:
    """Half the rounds accept all four drafts, half none: α = 0.5 but a round yields 3 tokens, not 1.94."""
    stages = StageModel()
    for _ in range(50):
        stages.observe_round(4, 4)
        stages.observe_round(4, 0)
    assert stages.tokens_per_round(4) == pytest.approx(3.0, abs=0.05)
    assert tokens_per_round(0.5, 4) == pytest.approx(1.9375)
    assert stages.tokens_per_round(6) > stages.tokens_per_round(4), "beyond the data it extrapolates"


def test_survival_never_increases_with_position() -> None:
    stages = StageModel()
    for _ in range(20):
        stages.observe_round(2, 0)
        stages.observe_round(3, 3)
    # Position 3 was only reached by the all-accepted rounds, but it cannot beat position 2.
    assert stages.tokens_per_round(3) - stages.tokens_per_round(2) <= stages.tokens_per_round(2) - 1


def test_draft_prefill_chunks_hold_at_most_the_token_budget() -> None:
    from types import SimpleNamespace

    from services.router.drafting import token_chunks

    requests = [SimpleNamespace(tokens=[0] * n) for n in (300, 200, 100, 700, 50, 50)]
    chunks = token_chunks(requests, 512)
    assert [[len(r.tokens) for r in chunk] for chunk in chunks] == [[300, 200], [100], [700], [50, 50]]
    assert [r for chunk in chunks for r in chunk] == requests  # every request once, in order


def test_verify_cost_interpolates_and_extrapolates_in_k() -> None:
    cost = VerifyCost()
    for b in (1, 4):
        cost.observe(b, 0, 100.0 + 10 * b)
        cost.observe(b, 4, 140.0 + 20 * b)
    assert cost(4, 4) == pytest.approx(220.0)
    assert cost(4, 2) == pytest.approx((140.0 + 220.0) / 2)
    assert cost(4, 8) == pytest.approx(220.0 + (220.0 - 140.0)), "past the data: the nearest two's slope"
    only = VerifyCost()
    only.observe(2, 4, 50.0)
    assert only(2, 8) == only(2, 0) == pytest.approx(50.0), "one length measured: the same for every k"


def test_verify_cost_growing_with_k_shortens_the_draft() -> None:
    """Same acceptance and draft cost; when each draft token also costs the target, fewer drafts pay."""
    flat = model(lambda b: 5.0, lambda b, k: 100.0, alpha=0.9, verified_k=(0, 8))
    steep = model(lambda b: 5.0, lambda b, k: 100.0 + 40.0 * k, alpha=0.9, verified_k=(0, 8))
    assert best_plan(steep, 1, k_max=8).k < best_plan(flat, 1, k_max=8).k


def test_k_holds_for_small_predicted_gains_and_moves_for_clear_ones() -> None:
    stages = model(lambda b: 10.0, lambda b, k: 60.0 + 2.0 * k, alpha=0.8, verified_k=(0, 8))
    best = best_plan(stages, 1, k_max=8)
    neighbour = Plan(1, best.k - 1, 0.0)
    assert predicted_rate(stages, 1, 1, neighbour.k) > best.tokens_per_s / 1.03, "premise: a near-flat optimum"
    assert next_plan(stages, neighbour, sequences=1, k_max=8).k == neighbour.k
    plan, path = Plan(1, 1, 0.0), [1]
    for _ in range(8):  # a clear gain moves k, one measured step per boundary, until within 3 % of the best
        plan = next_plan(stages, plan, sequences=1, k_max=8)
        path.append(plan.k)
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(path)) and path[1] == 2
    assert predicted_rate(stages, 1, 1, plan.k) >= best.tokens_per_s / 1.03 and plan.k > 2
    assert next_plan(stages, Plan(2, 3, 0.0), sequences=0, k_max=8) == Plan(2, 3, 0.0), "idle: nothing changes"


def test_plan_holds_its_start_until_acceptance_is_measured() -> None:
    stages = model(lambda b: 10.0, lambda b, k: 60.0 + 2.0 * k, alpha=0.3)
    start = Plan(2, 4, 0.0)
    assert next_plan(stages, start, sequences=1, k_max=8).k < 4, "premise: measured, a low acceptance cuts k"
    fresh = StageModel(alone=stages.alone, shared=stages.shared)
    fresh.observe_acceptance(1000, 300)
    assert next_plan(fresh, start, sequences=1, k_max=8) == start


def test_plain_decoding_is_chosen_outright_when_drafting_stops_paying_and_left_when_it_pays() -> None:
    """A batched decode almost as cheap as one sequence's, a draft step half of it: target-only wins at load,
    and k steps of one would take four trials to get there, so the plan jumps; it jumps back only for a clear gain."""
    cheap_decode = model(lambda b: 25.0 + 2 * b, lambda b, k: 50.0 + 2 * b + 12.0 * k * b, alpha=0.8,
                         verified_k=(0, 4))
    loaded = next_plan(cheap_decode, Plan(2, 4, 0.0), sequences=16, k_max=8, resume_k=4)
    assert (loaded.lanes, loaded.k) == (1, 0)
    cheap_draft = model(lambda b: 5.0 + b, lambda b, k: 50.0 + 2 * b + 2.0 * k * b, alpha=0.8, verified_k=(0, 4))
    assert next_plan(cheap_draft, Plan(1, 0, 0.0), sequences=1, k_max=8, resume_k=4).k == 4, "pays 2x: resume"
    assert next_plan(cheap_decode, Plan(1, 0, 0.0), sequences=1, k_max=8, resume_k=4).k == 0, "pays < 25 %: stay"


def test_the_drafts_prefill_of_new_prompts_counts_against_speculating() -> None:
    stages = model(lambda b: 5.0 + b, lambda b, k: 40.0 + 4 * b + 2 * k * b, alpha=0.8, verified_k=(0, 4))
    assert best_plan(stages, 8, k_max=8).k > 0
    stages.asked = [64] * 8
    stages.observe_draft_prefill(2 * 3200.0, prompts=2)  # 3.2 s a prompt, 64 tokens asked
    assert stages.draft_prefill_per_round(4) == pytest.approx(3200.0 / 64 * stages.tokens_per_round(4))
    assert best_plan(stages, 8, k_max=8).k == 0


def test_a_draft_back_before_acceptance_is_known_resumes_speculating() -> None:
    fresh = StageModel(alone=model(lambda b: 5.0, lambda b, k: 50.0, alpha=0.8).alone)
    resumed = next_plan(fresh, Plan(1, 0, 0.0), sequences=4, k_max=8, resume_k=4)
    assert (resumed.lanes, resumed.k) == (1, 4)


def test_before_acceptance_is_measured_plain_decoding_starts_only_on_a_clear_predicted_gain() -> None:
    """At high load auto must not spend its first rounds finding out that drafting does not pay, but on the prior
    alone it drops only for a clear margin, and once dropped it does not bounce back at the same load."""
    def fresh(draft_step, verify) -> StageModel:
        costs = model(draft_step, verify, alpha=0.7, verified_k=(0, 4))
        return StageModel(alone=costs.alone, shared=costs.shared)

    cheap_decode = fresh(lambda b: 25.0 + 2 * b, lambda b, k: 50.0 + 2 * b + 12.0 * k * b)
    assert cheap_decode.rounds == 0
    assert next_plan(cheap_decode, Plan(2, 4, 0.0), sequences=16, k_max=8, resume_k=4) == Plan(1, 0, pytest.approx(
        predicted_rate(cheap_decode, 16, 1, 0)))
    assert next_plan(cheap_decode, Plan(1, 0, 0.0), sequences=16, k_max=8, resume_k=4).k == 0, "no bounce"
    close = fresh(lambda b: 10.0 + b, lambda b, k: 50.0 + 4 * b + 2.0 * k * b)
    rates = [predicted_rate(close, 16, 1, k) for k in (0, 4)]
    assert rates[1] < rates[0] < PRIOR_DROP_GAIN * rates[1], "premise: target-only ahead, but by less than the margin"
    assert next_plan(close, Plan(1, 4, 0.0), sequences=16, k_max=8, resume_k=4).k == 4


def test_one_prompt_over_its_first_rounds_does_not_outweigh_drafting() -> None:
    """A lone request's draft prefill, paid once, must not make its first rounds look too costly to speculate."""
    costs = model(lambda b: 28.0, lambda b, k: 150.0 + 5.0 * k, alpha=0.7, verified_k=(0, 4))
    fresh = StageModel(alone=costs.alone, shared=costs.shared)
    fresh.asked = [64]
    fresh.observe_draft_prefill(600.0, prompts=1)
    fresh.observe_round(4, 3)
    fresh.observe_round(4, 2)
    assert next_plan(fresh, Plan(1, 4, 0.0), sequences=1, k_max=8, resume_k=4).k == 4


def test_early_stops_are_costed_by_the_steps_they_run() -> None:
    """With --draft-stop-below a round of k may run fewer draft steps: half the rounds here stop after one
    draft. The model must cost 2.5 steps at one sequence (but ~k for a batch, whose step runs while any row
    drafts) and count acceptance over every round that could have drafted a position."""
    stages = StageModel()
    for _ in range(100):
        stages.observe_round(1, 0, cap=4)
        stages.observe_round(4, 4, cap=4)
    assert stages.draft_steps(4) == pytest.approx(2.5, abs=0.05)
    assert stages.draft_steps(4, sequences=8) == pytest.approx(1 + 3 * (1 - 0.5 ** 8), abs=0.05)
    assert stages.tokens_per_round(4) == pytest.approx(3.0, abs=0.05)
    stages.observe_propose(1, 1, 10.0)  # a propose that stopped after one step: 10 ms a step, not 2.5
    stages.observe_verify(1, 4, 50.0)
    assert stages.draft_step(1) == pytest.approx(10.0)
    assert predicted_rate(stages, 1, 1, 4) == pytest.approx(stages.tokens_per_round(4) / (2.5 * 10 + 50) * 1e3,
                                                            rel=0.02)


def test_rounds_without_drafts_leave_alpha_alone() -> None:
    """A long spell of target-only rounds (each reports no drafts) once decayed α's sums to 0 / 0."""
    stages = StageModel()
    for _ in range(80_000):
        stages.observe_acceptance(0, 0)
    assert stages.alpha == pytest.approx(0.7)


def test_sequences_beyond_what_the_lanes_hold_wait() -> None:
    """A lane holds --max-batch sequences: at 40 in flight and 16 a lane, one lane serves 16 of them and two
    serve 32, so where a forward costs the same at any batch two lanes win, not one batch of all 40."""
    stages = model(lambda b: 10.0, lambda b, k: 50.0, alpha=0.8)
    assert best_plan(stages, 40, k_max=8).lanes == 1, "premise: one lane if it held all 40"
    stages.lane_capacity = 16
    assert predicted_rate(stages, 40, 1, 4) == pytest.approx(predicted_rate(stages, 16, 1, 4))
    assert predicted_rate(stages, 40, 2, 4) == pytest.approx(predicted_rate(stages, 32, 2, 4))
    assert best_plan(stages, 40, k_max=8).lanes == 2
