"""k moves only on a measured gain: synthetic round costs in, the plan the trial lets through out."""

import random

import pytest

from services.router.k_trial import CostWindow, KTrial
from services.router.policy import Plan


def tokens_per_round(k: int) -> float:
    """A measured acceptance curve: each further draft survives with probability 0.85."""
    return sum(0.85 ** i for i in range(k + 1))


def run_rounds(trial: KTrial, plan: Plan, rate: float, sequences: int = 16, rounds: int = 4) -> None:
    """`rounds` lane rounds of `sequences` at this plan, timed so that it gains `rate` tokens per ms."""
    for _ in range(rounds):
        trial.observe(plan.lanes, plan.k, sequences, ms=sequences * tokens_per_round(plan.k) / rate)


def settled(trial: KTrial, plan: Plan, rate: float) -> Plan:
    """The trial's first look at a plan, then a full window of rounds at it."""
    assert trial.decide(plan, plan, 16) == plan
    run_rounds(trial, plan, rate, rounds=8)
    return plan


def test_a_step_that_measures_slower_is_undone_and_not_retried_for_a_while() -> None:
    trial = KTrial(tokens_per_round, window=64, lane_window=8, hold=1024)
    four = settled(trial, Plan(2, 4, 0.0), rate=1.0)
    five = trial.decide(four, Plan(2, 5, 9.9), 16)
    assert five.k == 5, "a proposed step goes on trial once the current k has a full window"
    run_rounds(trial, five, rate=0.5, rounds=4)
    assert trial.decide(five, five, 16) == five, "half a window is not yet a measurement"
    run_rounds(trial, five, rate=0.95, rounds=4)
    assert trial.decide(five, five, 16).k == 4, "slower than before the step: undone"
    run_rounds(trial, four, rate=1.0, rounds=8)
    assert trial.decide(four, Plan(2, 5, 9.9), 16).k == 4, "the same step is blocked"
    assert trial.decide(four, Plan(2, 3, 9.9), 16).k == 3, "the other direction is not"


def test_a_step_that_measures_faster_is_kept_and_becomes_the_new_baseline() -> None:
    trial = KTrial(tokens_per_round)
    four = settled(trial, Plan(2, 4, 0.0), rate=1.0)
    five = trial.decide(four, Plan(2, 5, 0.0), 16)
    run_rounds(trial, five, rate=1.1, rounds=8)
    assert trial.decide(five, five, 16).k == 5
    six = trial.decide(five, Plan(2, 6, 0.0), 16)
    assert six.k == 6, "the kept step's rounds are the next step's baseline"
    run_rounds(trial, six, rate=1.11, rounds=8)
    assert trial.decide(six, six, 16).k == 5, "a gain under the margin is not a gain"


def test_the_cost_is_compared_not_the_tokens_a_window_happened_to_gain() -> None:
    """A step to k + 1 costs 5 % more a round and gains the curve's extra 0.85^(k+1) tokens (+11 % at
    k = 4): kept, whatever the acceptance of those particular rounds was."""
    trial = KTrial(tokens_per_round)
    four = settled(trial, Plan(2, 4, 0.0), rate=1.0)
    five = trial.decide(four, Plan(2, 5, 0.0), 16)
    cost_at_four = 16 * tokens_per_round(4)
    for _ in range(8):
        trial.observe(2, 5, 16, ms=1.05 * cost_at_four)
    assert trial.decide(five, five, 16).k == 5


def test_a_step_needs_a_full_window_of_the_current_k_first() -> None:
    trial = KTrial(tokens_per_round, window=64, lane_window=8)
    four = Plan(2, 4, 0.0)
    assert trial.decide(four, Plan(2, 5, 0.0), 16) == four
    run_rounds(trial, four, rate=1.0, rounds=7)
    assert trial.decide(four, Plan(2, 5, 0.0), 16) == four, "64 sequence rounds, but only 7 lane rounds"
    run_rounds(trial, four, rate=1.0, rounds=1)
    assert trial.decide(four, Plan(2, 5, 0.0), 16).k == 5


def test_a_load_change_abandons_the_trial_and_layout_switches_pass_through() -> None:
    trial = KTrial(tokens_per_round)
    four = settled(trial, Plan(2, 4, 0.0), rate=1.0)
    five = trial.decide(four, Plan(2, 5, 0.0), 16)
    run_rounds(trial, five, rate=2.0, rounds=4)
    assert trial.decide(five, five, 8).k == 4, "at half the load the costs do not compare: back to k = 4"
    one_lane = Plan(1, 3, 0.0)
    assert trial.decide(Plan(2, 4, 0.0), one_lane, 8) == one_lane


def test_a_model_that_always_wants_more_drafts_cannot_walk_k_off_the_measured_peak() -> None:
    """The C = 32 failure: every boundary the model proposes k + 1. True rate peaks at k = 4 and falls 8 %
    a step; each lane round is timed with 10 % noise. k must stay at the peak nearly all the time."""
    draws = random.Random(0)
    trial = KTrial(tokens_per_round)
    plan, rounds_at = Plan(2, 4, 0.0), {}
    for _ in range(4000):
        plan = trial.decide(plan, Plan(2, plan.k + 1, 0.0), 32)
        true_rate = 1.0 - 0.08 * abs(plan.k - 4)
        run_rounds(trial, plan, true_rate * draws.gauss(1.0, 0.1), sequences=16, rounds=1)
        rounds_at[plan.k] = rounds_at.get(plan.k, 0) + 1
    assert max(rounds_at) <= 6, rounds_at
    assert rounds_at[4] >= 0.85 * sum(rounds_at.values()), rounds_at


def test_from_a_mistuned_k_the_trials_walk_to_the_peak() -> None:
    """Started at k = 8 with the true rate peaking at k = 4 (8 % a step), a model that proposes the step
    towards the peak gets there, and stays, within a few windows per step."""
    draws = random.Random(1)
    trial = KTrial(tokens_per_round)
    plan = Plan(2, 8, 0.0)
    for _ in range(400):
        plan = trial.decide(plan, Plan(2, plan.k - 1 if plan.k > 4 else 5, 0.0), 32)
        run_rounds(trial, plan, (1.0 - 0.08 * abs(plan.k - 4)) * draws.gauss(1.0, 0.1), sequences=16, rounds=1)
    assert plan.k == 4


def test_a_sequence_round_that_drafted_nothing_makes_one_token() -> None:
    """A completion's last round, or a request the draft refused, gains one token whatever k the lane ran."""
    window = CostWindow(lanes=1, k=4, sequences=4)
    window.add(4, 100.0, limit=float("inf"), plain=1)
    assert window.rate(tokens_per_round) == pytest.approx((3 * tokens_per_round(4) + 1) / 100.0)
    window.add(4, 100.0, limit=4, plain=0)  # halving keeps the share
    assert window.plain == 0.5 and window.rounds == 6
