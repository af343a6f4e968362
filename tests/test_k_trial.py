"""k moves only on a measured gain: synthetic round times in, the plan the trial lets through out."""

import random

from services.router.k_trial import KTrial
from services.router.policy import Plan


def run_rounds(trial: KTrial, plan: Plan, rate: float, sequences: int = 16, rounds: int = 16) -> None:
    """`rounds` lane rounds of `sequences` at this plan, each gaining tokens at `rate` tokens per ms."""
    for _ in range(rounds):
        trial.observe(plan.lanes, plan.k, sequences, tokens=4 * sequences, ms=4 * sequences / rate)


def settled(trial: KTrial, plan: Plan, rate: float) -> Plan:
    """The trial's first look at a plan, then a full window of rounds at it."""
    assert trial.decide(plan, plan, 16) == plan
    run_rounds(trial, plan, rate)
    return plan


def test_a_step_that_measures_slower_is_undone_and_not_retried_for_a_while() -> None:
    trial = KTrial(window=256, hold=2048)
    four = settled(trial, Plan(2, 4, 0.0), rate=1.0)
    five = trial.decide(four, Plan(2, 5, 9.9), 16)
    assert five.k == 5, "a proposed step goes on trial once the current k has a full window"
    run_rounds(trial, five, rate=0.5, rounds=8)
    assert trial.decide(five, five, 16) == five, "half a window is not yet a measurement"
    run_rounds(trial, five, rate=0.95, rounds=8)
    assert trial.decide(five, five, 16).k == 4, "slower than before the step: undone"
    run_rounds(trial, four, rate=1.0)
    assert trial.decide(four, Plan(2, 5, 9.9), 16).k == 4, "the same step is blocked"
    assert trial.decide(four, Plan(2, 3, 9.9), 16).k == 3, "the other direction is not"


def test_a_step_that_measures_faster_is_kept_and_becomes_the_new_baseline() -> None:
    trial = KTrial(window=256)
    four = settled(trial, Plan(2, 4, 0.0), rate=1.0)
    five = trial.decide(four, Plan(2, 5, 0.0), 16)
    run_rounds(trial, five, rate=1.1)
    assert trial.decide(five, five, 16).k == 5
    six = trial.decide(five, Plan(2, 6, 0.0), 16)
    assert six.k == 6, "the kept step's rounds are the next step's baseline"
    run_rounds(trial, six, rate=1.09)
    assert trial.decide(six, six, 16).k == 5, "a gain under the margin is not a gain"


def test_a_step_needs_a_full_window_of_the_current_k_first() -> None:
    trial = KTrial(window=256)
    four = Plan(2, 4, 0.0)
    assert trial.decide(four, Plan(2, 5, 0.0), 16) == four
    run_rounds(trial, four, rate=1.0, rounds=8)
    assert trial.decide(four, Plan(2, 5, 0.0), 16) == four


def test_a_load_change_abandons_the_trial_and_layout_switches_pass_through() -> None:
    trial = KTrial(window=256)
    four = settled(trial, Plan(2, 4, 0.0), rate=1.0)
    five = trial.decide(four, Plan(2, 5, 0.0), 16)
    run_rounds(trial, five, rate=2.0, rounds=8)
    assert trial.decide(five, five, 8).k == 4, "at half the load the rates do not compare: back to k = 4"
    one_lane = Plan(1, 3, 0.0)
    assert trial.decide(Plan(2, 4, 0.0), one_lane, 8) == one_lane


def test_a_model_that_always_wants_more_drafts_cannot_walk_k_off_the_measured_peak() -> None:
    """The C = 32 failure: every boundary the model proposes k + 1. True rate peaks at k = 4 and falls 8 %
    a step; each lane round is timed with 10 % noise. k must stay at the peak nearly all the time."""
    draws = random.Random(0)
    trial = KTrial()
    plan, rounds_at = Plan(2, 4, 0.0), {}
    for _ in range(4000):
        plan = trial.decide(plan, Plan(2, plan.k + 1, 0.0), 32)
        true_rate = 1.0 - 0.08 * abs(plan.k - 4)
        run_rounds(trial, plan, true_rate * draws.gauss(1.0, 0.1), sequences=16, rounds=1)
        rounds_at[plan.k] = rounds_at.get(plan.k, 0) + 1
    assert max(rounds_at) <= 6, rounds_at
    assert rounds_at[4] >= 0.85 * sum(rounds_at.values()), rounds_at
