"""Stage costs read at the host's pace (services/router/stage_costs.py): calibration's share of a cost moves as much
as live calls moved from calibration, noise does not make it wander, no move is counted twice, and a cost
measured live keeps its own measurements."""

import random

import pytest

from services.router.policy import Plan, next_plan, predicted_rate
from services.router.stage_costs import Pace
from services.router.stage_model import StageModel

DRAFT_MS = {False: lambda b: 20.0 + 2.0 * b, True: lambda b: 30.0 + 3.0 * b}  # alone, shared cores
VERIFY_MS = {False: lambda b, k: 60.0 + 5.0 * b + 4.0 * k * b, True: lambda b, k: 90.0 + 7.0 * b + 6.0 * k * b}


def calibrated() -> StageModel:
    """Start-up calibration: both sharings, batches 1, 4 and 8, verifies of 0 and 4 drafts."""
    stages = StageModel(lane_capacity=8)
    for shared in (False, True):
        for batch in (1, 4, 8):
            stages.observe_propose(batch, 4, 4 * DRAFT_MS[shared](batch), shared, paced=False)
            for k in (0, 4):
                stages.observe_verify(batch, k, VERIFY_MS[shared](batch, k), shared, paced=False)
    return stages


def run(stages: StageModel, calls: int, slower: float = 1.0, verify_slower: float = 1.0, shared: bool = False,
        batch: int = 4, noise: float = 0.0, seed: int = 0, paced: bool = True) -> None:
    """Live rounds at k = 4: a propose and a verify each, `slower` (verify also `verify_slower`) than calibrated."""
    draws = random.Random(seed)
    for _ in range(calls):
        jitter = [1 + draws.uniform(-noise, noise) for _ in range(2)]
        stages.observe_propose(batch, 4, 4 * DRAFT_MS[shared](batch) * slower * jitter[0], shared, paced)
        stages.observe_verify(batch, 4, VERIFY_MS[shared](batch, 4) * slower * verify_slower * jitter[1], shared,
                              paced)


def test_only_live_calls_move_the_pace() -> None:
    stages = calibrated()
    assert stages.pace.level == 0.0 and stages.verify(4, 0) == pytest.approx(VERIFY_MS[False](4, 0))
    run(stages, 20, slower=1.3, paced=False)
    assert stages.pace.level == 0.0, "calibration's calls measure the costs, not the host"
    assert stages.verify(4, 4) == pytest.approx(1.3 * VERIFY_MS[False](4, 4), rel=0.2), "but they are measured"
    fresh, pace = StageModel().alone.draft_step, Pace()
    for batch in (1, 2, 4, 8, 4, 4):  # never calibrated: nothing to measure the host against
        fresh.observe(batch, 10.0 + 5.0 * batch, pace)
    assert pace.level == 0.0 and fresh.live
    pace.observe(100.0)  # a call far off calibration's fit (a convex calibration at a batch it did not run)
    assert pace.factor < 1.3, "one call moves it by a bounded step"


def test_a_host_that_slowed_moves_the_costs_not_measured_since() -> None:
    stages = calibrated()
    run(stages, 200, slower=1.3)  # one lane speculating: target-only and two-lane costs go unmeasured
    assert stages.draft_step(4) == pytest.approx(1.3 * DRAFT_MS[False](4), rel=0.02)
    assert stages.verify(4, 4) == pytest.approx(1.3 * VERIFY_MS[False](4, 4), rel=0.02)
    assert stages.verify(4, 0) == pytest.approx(1.3 * VERIFY_MS[False](4, 0), rel=0.05), "target-only moved"
    assert stages.verify(4, 2) == pytest.approx(1.3 * VERIFY_MS[False](4, 2), rel=0.05), "between measured k's"
    assert stages.draft_step(2, shared=True) == pytest.approx(1.3 * DRAFT_MS[True](2), rel=0.05), "two lanes moved"
    assert stages.verify(2, 4, shared=True) == pytest.approx(1.3 * VERIFY_MS[True](2, 4), rel=0.05)


def test_a_move_is_not_counted_twice() -> None:
    """Measured in one lane, then in two: the two-lane costs were already read at the slower pace, so measuring
    them moves nothing further (counted again, one lane's costs would read 1.3² slower)."""
    stages = calibrated()
    run(stages, 200, slower=1.3)
    run(stages, 3, slower=1.3, shared=True)
    assert stages.draft_step(4, shared=True) == pytest.approx(1.3 * DRAFT_MS[True](4), rel=0.02), "taken up at once"
    run(stages, 200, slower=1.3, shared=True)
    assert stages.verify(4, 4) == pytest.approx(1.3 * VERIFY_MS[False](4, 4), rel=0.05)
    assert stages.verify(4, 0) == pytest.approx(1.3 * VERIFY_MS[False](4, 0), rel=0.05)
    run(stages, 200, slower=1.0, shared=True)  # and back: what was not measured live follows
    assert stages.verify(4, 0) == pytest.approx(VERIFY_MS[False](4, 0), rel=0.05)


def test_a_cost_measured_live_keeps_its_own_measurements() -> None:
    """One lane ran at calibration's pace; two lanes then run a third slower than calibrated (their contention on
    real traffic, not the host). Back in one lane, its costs are still its own, and two lanes' stay theirs: read at
    a pace shared by all, one lane would carry two lanes' move, and lose it on return, and the plan would flap."""
    stages = calibrated()
    run(stages, 200)
    run(stages, 200, slower=1.3, shared=True, batch=2)
    assert stages.verify(4, 4) == pytest.approx(VERIFY_MS[False](4, 4), rel=0.02)
    run(stages, 200)
    assert stages.verify(2, 4, shared=True) == pytest.approx(1.3 * VERIFY_MS[True](2, 4), rel=0.02)


def test_a_cost_measured_live_now_and_then_still_follows_the_host() -> None:
    """A round that sends no drafts verifies target-only (every completion's last round at C = 1): those few live
    calls at batch 1 must not leave target-only's cost at batch 4 where it stood when they began."""
    stages = calibrated()
    for slower in (1.3, 1.6):
        for round_ in range(200):
            run(stages, 1, slower=slower)
            if round_ % 10 == 0:
                stages.observe_verify(1, 0, VERIFY_MS[False](1, 0) * slower)
        assert stages.verify(4, 0) == pytest.approx(slower * VERIFY_MS[False](4, 0), rel=0.05), slower


def test_measured_costs_follow_their_own_calls() -> None:
    """Only the verify slowed (its contexts grew): each measured cost converges to its own time, not to the
    calibrated ratio between them, and the unmeasured ones move by the measured costs' mean move."""
    stages = calibrated()
    run(stages, 400, verify_slower=1.4)
    assert stages.draft_step(4) == pytest.approx(DRAFT_MS[False](4), rel=0.03)
    assert stages.verify(4, 4) == pytest.approx(1.4 * VERIFY_MS[False](4, 4), rel=0.03)
    moved = stages.verify(4, 0) / VERIFY_MS[False](4, 0)
    assert 1.1 < moved < 1.3, moved


def test_noise_does_not_make_the_pace_wander() -> None:
    for seed in range(3):
        stages = calibrated()
        run(stages, 3000, noise=0.3, seed=seed)
        assert stages.verify(4, 0) == pytest.approx(VERIFY_MS[False](4, 0), rel=0.06), seed
        assert stages.draft_step(2, shared=True) == pytest.approx(DRAFT_MS[True](2), rel=0.06), seed


def test_noise_over_changing_batches_and_draft_lengths_does_not_make_the_pace_wander() -> None:
    """Requests end (the batch shrinks), last rounds draft fewer, two lanes come and go: the costs measured
    change all the time, and still the pace only reflects the host, which did not move."""
    for seed in range(3):
        stages, draws = calibrated(), random.Random(seed)
        for _ in range(4000):
            shared, batch, k = draws.random() < 0.3, draws.choice((1, 2, 3, 4)), draws.choice((3, 4, 4, 4))
            jitter = [1 + draws.uniform(-0.3, 0.3) for _ in range(2)]
            stages.observe_propose(batch, k, k * DRAFT_MS[shared](batch) * jitter[0], shared)
            stages.observe_verify(batch, k, VERIFY_MS[shared](batch, k) * jitter[1], shared)
        assert abs(stages.pace.level) < 0.06, (seed, stages.pace.factor)


def test_a_batch_measured_before_the_host_moved_is_not_taken_for_a_move() -> None:
    """The host slows while one batch runs, then the load changes: the new batch's calls are measured against
    calibration's fit, not against the live calls before (counted again, unmeasured costs would read 1.3² slower),
    and a fit that forgot the other batches does not make the new one look like a move."""
    stages = calibrated()
    run(stages, 200, slower=1.3, batch=1)
    run(stages, 50, slower=1.3, batch=4)
    assert stages.pace.factor == pytest.approx(1.3, rel=0.05)
    assert stages.verify(4, 0) == pytest.approx(1.3 * VERIFY_MS[False](4, 0), rel=0.05)
    steady = calibrated()
    run(steady, 600, batch=1)  # long enough that the fit forgot the other batches
    run(steady, 5, batch=4)
    assert abs(steady.pace.level) < 0.02, steady.pace.factor


def test_the_pace_is_measured_at_batches_calibration_did_not_run() -> None:
    """C = 2 in one lane runs batches of 2, which calibration (1, 4, 8) did not: measured against the calibrated
    fit there, the host's move is taken, and not taken again when two lanes of 1 run next."""
    stages = calibrated()
    run(stages, 200, slower=1.3, batch=2)
    assert stages.verify(2, 0) == pytest.approx(1.3 * VERIFY_MS[False](2, 0), rel=0.05)
    run(stages, 200, slower=1.3, shared=True, batch=1)
    assert stages.draft_step(2) == pytest.approx(1.3 * DRAFT_MS[False](2), rel=0.02)
    assert stages.verify(2, 0) == pytest.approx(1.3 * VERIFY_MS[False](2, 0), rel=0.05)


def test_a_slower_host_does_not_move_the_plan_to_a_layout_measured_when_it_was_faster() -> None:
    """C = 4: one lane runs a little ahead of two. The host slows by 40 % while one lane runs; read at their
    calibrated times, two lanes would look 1.4x faster, and the plan would switch to them and lose."""
    paced, unpaced = calibrated(), calibrated()
    current = Plan(1, 4, 0.0)
    for stages in (paced, unpaced):
        for _ in range(100):
            stages.observe_round(4, 3, 4)
        assert predicted_rate(stages, 4, 1, 4) > predicted_rate(stages, 4, 2, 4), "premise: one lane ahead"
        run(stages, 200, slower=1.4, paced=stages is paced)  # unpaced: every cost read as last fitted
    assert next_plan(paced, current, sequences=4, k_max=8, resume_k=4).lanes == 1
    assert next_plan(unpaced, current, sequences=4, k_max=8, resume_k=4).lanes == 2, "premise: unpaced, it flips"
