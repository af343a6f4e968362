"""After a spell of target-only decoding, auto speculates again to measure acceptance afresh
(services/router/probe.py): a drop judged on a few untypical rounds must not stand for good, and where
target-only is right the probes must grow rare."""

import math
import random
from types import SimpleNamespace

import pytest

from services.router.auto_plan import AutoPlanner
from services.router.drafting import draft_backlog
from services.router.policy import MIN_ROUNDS_TO_JUMP, Plan, next_plan, predicted_rate
from services.router.probe import HELD_ROUNDS, PROBE_RATIO, STALE_ROUNDS, Probe
from services.router.stage_model import MIN_ROUNDS_TO_REPLAN, StageModel
from tests.test_policy import model

SEQUENCES, RESUME_K, K_MAX, BACKLOG = 4, 4, 8, 40


def stages() -> StageModel:
    """Verify and draft costs (k = 0 calibrated too) under which a draft accepted 80 % of the time beats
    target-only by 1.25x at 4 sequences (in two lanes) and one accepted 60 % of the time loses to it by 1.18x."""
    costs = model(lambda b: 10.0 + b, lambda b, k: 50.0 + 2 * b + 3 * k * b, alpha=0.7, verified_k=(0, 4))
    fresh = StageModel(alone=costs.alone, shared=costs.shared)
    fresh.observe_draft_sent(100, 50.0)  # 0.5 ms a token re-sent
    return fresh


def speculate(stages_: StageModel, alpha: float, rounds: int, seed: int = 0) -> None:
    draws = random.Random(seed)
    for _ in range(rounds):
        stages_.observe_round(RESUME_K, next((i for i in range(RESUME_K) if draws.random() >= alpha), RESUME_K))


def replan(probe: Probe, stages_: StageModel, current: Plan, sequences: int = SEQUENCES) -> Plan:
    wanted = next_plan(stages_, current, sequences, K_MAX, resume_k=RESUME_K)
    return probe.revise(stages_, current, wanted, sequences, K_MAX, RESUME_K, lambda: BACKLOG)


def drop(probe: Probe, stages_: StageModel, current: Plan, rounds: int = 40) -> Plan:
    speculate(stages_, alpha=0.6, rounds=rounds, seed=1)
    dropped = replan(probe, stages_, current)
    assert dropped.k == 0, "premise: measured acceptance this low drops to target-only"
    return dropped


def round_ms(stages_: StageModel) -> float:
    """A target-only lane round of all the sequences."""
    return SEQUENCES / predicted_rate(stages_, SEQUENCES, 1, 0) * 1e3


def measure(probe: Probe, stages_: StageModel, plan: Plan, alpha: float, cost: float, lane_rounds: int = 6) -> Plan:
    """Probe rounds of all the sequences at `alpha`, each lane round taking `cost` times a target-only one: at
    k = 4 a round makes 1 to 5 tokens, so cost 1 measures speculating ahead, 6 behind."""
    for _ in range(lane_rounds):
        speculate(stages_, alpha, SEQUENCES, seed=7)
        probe.observe(plan.lanes, plan.k, SEQUENCES, round_ms(stages_) * cost)
    return replan(probe, stages_, plan)


def spell(probe: Probe, stages_: StageModel, plan: Plan, limit: int = 2000) -> tuple[Plan, int]:
    """Target-only rounds until the plan speculates again; returns it and the rounds run."""
    for rounds in range(limit):
        probe.observe(1, 0, SEQUENCES, round_ms(stages_))
        plan = replan(probe, stages_, plan)
        if plan.k:
            return plan, rounds + 1
    return plan, limit


@pytest.mark.parametrize("history", [40, 600], ids=["early drop", "long history"])
def test_a_drop_on_low_acceptance_is_probed_and_undone_when_acceptance_rises(history: int) -> None:
    stages_, probe = stages(), Probe()
    dropped = drop(probe, stages_, Plan(1, RESUME_K, 0.0), rounds=history)
    assert replan(probe, stages_, dropped).k == 0, "the stale estimate alone does not resume"
    probed, rounds = spell(probe, stages_, dropped)
    assert probed.k == RESUME_K and probe.probing
    # Due once the spell's device time is PROBE_RATIO times the probe's cost: re-sending the backlog at 0.5 ms a
    # token, and 16 sequence rounds plus each lane's first (4 more) at what speculating is predicted to cost, not
    # at the spell's pace. The probe runs two lanes of 2, each round's slower stage a verify of 4 drafts at batch
    # 2 (50 + 2·2 + 3·4·2 = 78 ms against 4 draft steps of 12): 39 ms a sequence round, where a target-only one
    # costs 58 / 4.
    assert probed.lanes == 2
    ms = round_ms(stages_)
    assert rounds == math.ceil(PROBE_RATIO * (BACKLOG * 0.5 + (16 + SEQUENCES) * 78.0 / 2) / ms)
    assert stages_.rounds == 0 and stages_.reached[1] == pytest.approx(STALE_ROUNDS), "the probe's rounds decide"
    assert measure(probe, stages_, probed, alpha=0.8, cost=1.0).k > 0, "the probe measured drafting paying"
    assert not probe.probing


def test_probes_that_end_in_a_drop_double_the_next_spell_until_one_holds() -> None:
    stages_, probe = stages(), Probe()
    plan = drop(probe, stages_, Plan(1, RESUME_K, 0.0))
    spells = []
    for _ in range(3):
        plan, rounds = spell(probe, stages_, plan)
        spells.append(rounds)
        assert plan.k == RESUME_K
        plan = measure(probe, stages_, plan, alpha=0.6, cost=6.0)
        assert plan.k == 0
    assert probe.failed_in_a_row == 3
    assert spells[1] >= 2 * spells[0] - 1 and spells[2] >= 2 * spells[1] - 1
    plan, _ = spell(probe, stages_, plan)
    assert measure(probe, stages_, plan, alpha=0.8, cost=1.0).k > 0
    while probe.speculated < HELD_ROUNDS:
        speculate(stages_, alpha=0.8, rounds=SEQUENCES, seed=int(probe.speculated))
        probe.observe(plan.lanes, plan.k, SEQUENCES, round_ms(stages_))
    assert replan(probe, stages_, plan).k > 0
    assert probe.failed_in_a_row == 0 and not probe.probing, "a probe that holds resets the doubling"


def test_a_probe_is_judged_on_what_it_measured_not_on_the_model() -> None:
    """Until the probe has measured MIN_ROUNDS_TO_JUMP rounds (its first lane round, which re-sends, left out) it
    holds, whatever the model wants; then its measured tokens per device ms decide, even where the model
    predicts speculating wins (here acceptance is high, but each round costs more than it makes)."""
    stages_, probe = stages(), Probe()
    plan, _ = spell(probe, stages_, drop(probe, stages_, Plan(1, RESUME_K, 0.0)))
    assert plan.k == RESUME_K
    short = plan.lanes + MIN_ROUNDS_TO_JUMP // SEQUENCES - 1  # each lane's first round is left out
    measure(probe, stages_, plan, alpha=0.8, cost=6.0, lane_rounds=short)
    assert probe.revise(stages_, plan, Plan(1, 0, 0.0), SEQUENCES, K_MAX, RESUME_K, lambda: BACKLOG) == plan
    assert next_plan(stages_, plan, SEQUENCES, K_MAX, resume_k=RESUME_K).k > 0, "premise: the model would go on"
    assert measure(probe, stages_, plan, alpha=0.8, cost=6.0, lane_rounds=1).k == 0
    assert probe.failed_in_a_row == 1 and not probe.probing
    dropped = Plan(1, 0, 0.0)
    assert next_plan(stages_, dropped, SEQUENCES, K_MAX, resume_k=RESUME_K).k > 0, "premise: the model would resume"
    assert replan(probe, stages_, dropped).k == 0, "at the load the probe failed at, only a probe resumes"
    assert replan(probe, stages_, dropped, sequences=1).k > 0, "at another load the model decides again"


def test_no_probe_where_target_only_is_far_ahead_nor_when_idle() -> None:
    """At high load a batched decode wins by far: the stale estimate is trusted and no probe runs, without
    making later spells longer; an idle router (no sequences) never probes."""
    costs = model(lambda b: 25.0 + 2 * b, lambda b, k: 50.0 + 2 * b + 12.0 * k * b, alpha=0.8, verified_k=(0, 4))
    costs.observe_draft_sent(100, 50.0)
    probe = Probe()
    plan = probe.revise(costs, Plan(1, 4, 0.0), Plan(1, 0, 0.0), 16, K_MAX, RESUME_K, lambda: 0)
    for _ in range(200):
        probe.observe(1, 0, 16, 100.0)
        plan = probe.revise(costs, plan, next_plan(costs, plan, 16, K_MAX, resume_k=RESUME_K), 16, K_MAX,
                            RESUME_K, lambda: 0)
        assert plan.k == 0
    assert probe.failed_in_a_row == 0 and probe.spell.ms < 200 * 100.0, "checked, and the spell started over"
    probe.observe(1, 0, 1000, 1e6)  # a spell long enough to be due
    assert probe.revise(costs, plan, plan, 0, K_MAX, RESUME_K, lambda: 0) == plan and probe.spell.ms >= 1e6


def test_discounting_keeps_the_survival_curve_and_its_prior() -> None:
    stages_ = stages()
    speculate(stages_, alpha=0.7, rounds=300)
    before = [*(stages_.tokens_per_round(k) for k in range(1, 5)), stages_.alpha]
    stages_.discount_acceptance(0.1)
    assert [*(stages_.tokens_per_round(k) for k in range(1, 5)), stages_.alpha] == pytest.approx(before)
    assert stages_.rounds == 0


def test_the_backlog_is_what_the_draft_would_be_sent() -> None:
    def request(tokens: int, draft_len: int, epoch: int, speculate: bool = True, remaining: int = 10,
                done: bool = False):
        return SimpleNamespace(tokens=list(range(tokens)), draft_len=draft_len, draft_epoch=epoch,
                               speculate=speculate, remaining=remaining, done=done)

    held = request(30, 25, epoch=2)  # the draft holds 25 of its 30 tokens
    lost = request(30, 25, epoch=1)  # held before the draft restarted
    new = request(12, 0, epoch=-1)
    never = [request(50, 0, -1, speculate=False), request(50, 0, -1, remaining=1),  # decoded by the target alone
             request(50, 0, -1, done=True)]
    assert draft_backlog([held, lost, new, *never], epoch=2) == 5 + 30 + 12


def test_the_draft_going_down_starts_any_spell_afresh() -> None:
    planner = AutoPlanner(stages(), RESUME_K, K_MAX)
    planner.probe.observe(1, 0, SEQUENCES, 1e6)
    planner.probe.failed_in_a_row = 3
    assert planner.next(Plan(2, RESUME_K, 0.0), SEQUENCES, speculating=False, backlog=lambda: 0) == Plan(1, 0, 0.0)
    assert planner.probe == Probe(), "no spell, no failed probes carried over to when the draft is back"


def test_a_kept_probe_holds_until_acceptance_is_well_measured() -> None:
    """A probe that measured speculating ahead is not undone on the spot by a model that still predicts
    target-only ahead (acceptance 0.4 here): it holds until MIN_ROUNDS_TO_REPLAN rounds, then the model decides."""
    stages_, probe = stages(), Probe()
    plan, _ = spell(probe, stages_, drop(probe, stages_, Plan(1, RESUME_K, 0.0)))
    plan = measure(probe, stages_, plan, alpha=0.4, cost=1.0)
    assert plan.k == RESUME_K and probe.kept and not probe.probing
    assert next_plan(stages_, plan, SEQUENCES, K_MAX, resume_k=RESUME_K).k == 0, "premise: the model would drop"
    while stages_.rounds < MIN_ROUNDS_TO_REPLAN - SEQUENCES:
        speculate(stages_, alpha=0.4, rounds=SEQUENCES, seed=int(stages_.rounds))
        assert replan(probe, stages_, plan) == plan
    speculate(stages_, alpha=0.4, rounds=SEQUENCES, seed=5)
    assert replan(probe, stages_, plan).k == 0 and not probe.kept
    assert probe.failed_in_a_row == 1, "undone later, the probe still failed: the next spell backs off"


@pytest.mark.parametrize("rounds_at_two", [1, 20], ids=["too few rounds there", "enough"])
def test_a_probe_is_judged_against_target_only_at_its_own_load(rounds_at_two: int) -> None:
    """A spell that ran at 16 sequences decodes far more per ms than 2 can: a probe at 2 is judged against
    target-only at 2 — measured, where enough of the spell's rounds ran there (here 10 % slower than the model
    says), else the model's."""
    stages_, probe = stages(), Probe()
    plan = drop(probe, stages_, Plan(1, RESUME_K, 0.0))
    at = {b: b / predicted_rate(stages_, b, 1, 0) * 1e3 for b in (2, 16)}  # a target-only lane round's ms
    for _ in range(200):
        probe.observe(1, 0, 16, at[16])
    for round_ in range(rounds_at_two):
        probe.observe(1, 0, 2, 1.1 * at[2])
        if round_ % 5 == 4:  # the load dips back to 16 for a round now and then: 2's rounds still count
            probe.observe(1, 0, 16, at[16])
    assert probe.spell.rate(stages_.tokens_per_round) > 1.5 * 2 / at[2], "premise: the spell's pooled rate is 16's"
    probed = probe.revise(stages_, plan, Plan(1, 0, 0.0), 2, K_MAX, RESUME_K, lambda: BACKLOG)
    assert probed.k == RESUME_K
    each = 2 // probed.lanes
    for _ in range(probed.lanes + MIN_ROUNDS_TO_JUMP // each):  # each lane's first round, then 16 sequence rounds
        probe.observe(probed.lanes, probed.k, each, 1e6)
    assert probe.revise(stages_, probed, probed, 2, K_MAX, RESUME_K, lambda: BACKLOG).k == 0
    expected = 2 / at[2] / (1.1 if rounds_at_two * 2 >= MIN_ROUNDS_TO_JUMP else 1.0)
    assert probe.alone_rate == pytest.approx(expected)


def test_a_probe_is_judged_against_target_only_at_the_load_its_rounds_ran() -> None:
    """A probe begun as a wave drained, at 1 sequence, whose rounds then ran at 4: target-only at 1 decodes a
    third of what it does at 4 per ms, so judged at 1 the probe would be kept where it lost."""
    stages_, probe = stages(), Probe()
    plan = drop(probe, stages_, Plan(1, RESUME_K, 0.0))
    while not probe.spell.ms or not probe._due(stages_, Plan(1, RESUME_K, 1.0), 1, BACKLOG):
        probe.observe(1, 0, SEQUENCES, round_ms(stages_))
    probed = probe.revise(stages_, plan, Plan(1, 0, 0.0), 1, K_MAX, RESUME_K, lambda: BACKLOG)
    assert probed.k == RESUME_K, "premise: the probe starts at 1 sequence"
    alone_at = {n: predicted_rate(stages_, n, 1, 0) / 1e3 for n in (1, SEQUENCES)}
    assert alone_at[SEQUENCES] > 2.5 * alone_at[1], "premise: target-only decodes far more per ms at 4"
    speculate(stages_, alpha=0.8, rounds=SEQUENCES * 8, seed=3)
    rate_ms = SEQUENCES * stages_.tokens_per_round(RESUME_K) / (alone_at[1] + alone_at[SEQUENCES]) * 2
    judged = probed
    for _ in range(probed.lanes + MIN_ROUNDS_TO_JUMP // SEQUENCES):  # between the two target-only rates; a round
        probe.observe(probed.lanes, probed.k, SEQUENCES, rate_ms)  # boundary after each, with 4 in flight
        judged = probe.revise(stages_, probed, probed, SEQUENCES, K_MAX, RESUME_K, lambda: BACKLOG)
    assert judged.k == 0
    assert probe.alone_rate == pytest.approx(alone_at[SEQUENCES])


def test_beyond_a_lanes_capacity_the_probe_is_judged_at_what_a_lane_holds() -> None:
    """With 20 in flight and lanes of 8, a target-only round runs 8, or a little fewer (a lane's token budget):
    the nearest size that ran enough is the load the probe is judged at."""
    stages_, probe = stages(), Probe()
    stages_.lane_capacity = 8
    plan = drop(probe, stages_, Plan(1, RESUME_K, 0.0))
    seven_ms = 7 / predicted_rate(stages_, 7, 1, 0) * 1e3
    for _ in range(3 * MIN_ROUNDS_TO_JUMP):  # a spell long enough for a probe of lanes of 8 to be due
        probe.observe(1, 0, 7, 1.2 * seven_ms)
        probe.observe(1, 0, 2, 1.0)  # a few rounds at a far smaller size: not comparable, never chosen
    probed = probe.revise(stages_, plan, Plan(1, 0, 0.0), 20, K_MAX, RESUME_K, lambda: BACKLOG)
    assert probed.k == RESUME_K and probed.lanes == 2
    for _ in range(probed.lanes + MIN_ROUNDS_TO_JUMP // 8):  # lanes of 8: 16 in flight
        probe.observe(probed.lanes, probed.k, 8, 1e6)
    assert probe.revise(stages_, probed, probed, 20, K_MAX, RESUME_K, lambda: BACKLOG).k == 0
    assert probe.alone_rate == pytest.approx(7 / seven_ms / 1.2)


def test_the_reference_is_this_spells_one_lane_rounds() -> None:
    """Target-only rounds beside another lane (which may run on fewer cores) are not what target-only costs, and
    a drop after speculating starts the reference afresh: rounds from before it may be long stale."""
    stages_, probe = stages(), Probe()
    probe.observe(2, 0, SEQUENCES, 1.0)
    assert not probe.by_load
    for _ in range(8):
        probe.observe(1, 0, SEQUENCES, round_ms(stages_))
    assert probe.by_load[SEQUENCES].rounds == 8 * SEQUENCES
    drop(probe, stages_, Plan(1, RESUME_K, 0.0))
    assert not probe.by_load


@pytest.mark.parametrize("held", [HELD_ROUNDS // 2, HELD_ROUNDS], ids=["undone soon after", "held up"])
def test_a_kept_probe_undone_soon_after_its_hold_still_failed(held: int) -> None:
    """Once the hold ends the policy may undo a kept probe, at once or after first keeping it a while: if it does
    within HELD_ROUNDS sequence rounds of speculating, the probe failed and the next spell backs off, else
    speculating had held up. (The policy's wish is given here, to follow the probe's rule alone.)"""
    stages_, probe = stages(), Probe()
    plan, _ = spell(probe, stages_, drop(probe, stages_, Plan(1, RESUME_K, 0.0)))
    plan = measure(probe, stages_, plan, alpha=0.9, cost=1.0)
    assert probe.kept and plan.k == RESUME_K
    while probe.speculated < held or stages_.rounds < MIN_ROUNDS_TO_REPLAN:
        speculate(stages_, alpha=0.9, rounds=SEQUENCES, seed=int(probe.speculated))
        probe.observe(plan.lanes, plan.k, SEQUENCES, round_ms(stages_))
        assert probe.revise(stages_, plan, plan, SEQUENCES, K_MAX, RESUME_K, lambda: BACKLOG) == plan
    assert probe.revise(stages_, plan, Plan(1, 0, 0.0), SEQUENCES, K_MAX, RESUME_K, lambda: BACKLOG).k == 0
    assert probe.failed_in_a_row == (1 if held < HELD_ROUNDS else 0)

