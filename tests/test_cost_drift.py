"""A host that slows down moves every stage cost, but a round measures only the costs of the plan it runs: the
others (target-only's verify while speculating, two lanes' costs while in one, a calibration from a faster
minute) must follow, or they win plans they then lose (StageModel._drift)."""

import pytest

from services.router.stage_model import StageModel


def calibrated() -> StageModel:
    stages = StageModel()
    for shared in (False, True):
        for batch in (1, 4):
            stages.observe_propose(batch, 4, 4 * (20.0 + 5 * batch) * (2 if shared else 1), shared)
            for k in (0, 4):
                stages.observe_verify(batch, k, (45.0 + 5 * batch + 3 * k * batch) * (2 if shared else 1), shared)
    return stages


def estimates(stages: StageModel) -> list[float]:
    return [f(b, shared) for shared in (False, True) for b in (1, 4)
            for f in (stages.draft_step, lambda b, s: stages.verify(b, 0, s), lambda b, s: stages.verify(b, 4, s))]


def test_calibration_observations_move_only_their_own_costs() -> None:
    stages = calibrated()
    assert not stages.drifts
    assert stages.verify(1, 0) == pytest.approx(50.0) and stages.verify(4, 4, shared=True) == pytest.approx(2 * 113)


def test_a_slower_host_measured_on_one_plan_slows_the_costs_of_every_other() -> None:
    stages = calibrated()
    before = estimates(stages)
    stages.drifts = True
    for _ in range(150):  # speculating in one lane at batch 1, on a host now 1.25x slower
        stages.observe_propose(1, 4, 1.25 * 4 * 25.0)
        stages.observe_verify(1, 4, 1.25 * 62.0)
    after = estimates(stages)
    # target-only (alone: 1, 4) and two lanes (shared: 6 to 11) follow; so do the measured costs at batch 1
    assert [after[i] for i in (0, 1, 2, 4, *range(6, 12))] == pytest.approx(
        [1.25 * before[i] for i in (0, 1, 2, 4, *range(6, 12))], rel=0.025)


def test_noise_about_the_same_speed_leaves_the_other_costs_where_they_were() -> None:
    stages = calibrated()
    before = estimates(stages)
    stages.drifts = True
    for i in range(150):
        stages.observe_verify(1, 4, 62.0 * (1.1 if i % 2 else 1 / 1.1))
    assert stages.verify(1, 0) == pytest.approx(before[1], rel=0.02)
    assert stages.verify(4, 0, shared=True) == pytest.approx(before[10], rel=0.02)
