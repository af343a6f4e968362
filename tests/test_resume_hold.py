"""auto resumes speculating only once the policy has wanted it across a lane round (AutoPlanner._held): a load dip
shorter than a round must not re-send the draft every sequence's backlog for one round."""

from services.router.auto_plan import AutoPlanner
from services.router.policy import Plan, best_plan, next_plan
from tests.test_policy import model
from tests.test_probe import BACKLOG, K_MAX, RESUME_K, SEQUENCES, drop, measure, round_ms, spell, stages


def test_speculating_resumes_on_a_load_that_lasted_a_round_not_on_a_dip() -> None:
    """A closed-loop client's requests end together and come back one by one: the first of a new wave alone must
    not resume speculating (re-sending the draft its backlog) for the one round before the others join. A load
    that lasts a lane round does resume."""
    stages_ = model(lambda b: 6.0 + b, lambda b, k: 30.0 + 2 * b + 6 * k * b, alpha=0.8, verified_k=(0, 4))
    planner, dropped = AutoPlanner(stages_, RESUME_K, K_MAX), Plan(1, 0, 0.0)
    assert next_plan(stages_, dropped, 1, K_MAX, resume_k=RESUME_K).k == RESUME_K, "premise: alone, drafting pays"
    assert next_plan(stages_, dropped, SEQUENCES, K_MAX, resume_k=RESUME_K).k == 0, "premise: at 4 it does not"

    def plan(sequences: int) -> Plan:
        return planner.next(dropped, sequences, speculating=True, backlog=lambda: BACKLOG)

    stages_.observe_draft_sent(100, 50.0)  # a probe is priced, and due after this long a spell
    for _ in range(1000):
        planner.price(1, 0, SEQUENCES, drafted=0, draft_ms=0.0, verify_ms=50.0, beside=False)
    alone = best_plan(stages_, 1, K_MAX, ks=range(RESUME_K, RESUME_K + 1))
    assert planner.probe._due(stages_, alone, 1, BACKLOG), "premise: unheld, a probe would start at 1"
    assert plan(1) == dropped and plan(1) == dropped, "asked twice before any round: held both times, no probe"
    assert not planner.probe.probing
    planner.price(1, 0, 1, drafted=0, draft_ms=0.0, verify_ms=37.0, beside=False)
    assert plan(SEQUENCES) == dropped, "the others joined: the dip is over"
    assert plan(1) == dropped, "a new dip waits for its own round"
    planner.price(1, 0, 1, drafted=0, draft_ms=0.0, verify_ms=37.0, beside=False)
    assert plan(1).k == RESUME_K, "one sequence for a whole round: speculating resumes"


def test_a_wish_to_resume_does_not_outlast_the_draft_going_down() -> None:
    """Rounds run while the draft is down do not count toward holding a resume wanted before it went down."""
    stages_ = model(lambda b: 6.0 + b, lambda b, k: 30.0 + 2 * b + 6 * k * b, alpha=0.8, verified_k=(0, 4))
    planner, dropped = AutoPlanner(stages_, RESUME_K, K_MAX), Plan(1, 0, 0.0)
    assert planner.next(dropped, 1, speculating=True, backlog=lambda: 0) == dropped
    assert planner.next(dropped, 1, speculating=False, backlog=lambda: 0) == dropped
    planner.price(1, 0, 1, drafted=0, draft_ms=0.0, verify_ms=37.0, beside=False)
    assert planner.next(dropped, 1, speculating=True, backlog=lambda: 0) == dropped, "back: held for a round"
    planner.price(1, 0, 1, drafted=0, draft_ms=0.0, verify_ms=37.0, beside=False)
    assert planner.next(dropped, 1, speculating=True, backlog=lambda: 0).k == RESUME_K


def test_a_resume_kept_back_at_a_failed_probes_load_starts_its_wait_over() -> None:
    """Where a probe failed, only a probe resumes (probe.py), though the policy wants to: those target-only rounds
    end the wish, so when the load falls, resuming at the new load still waits its round."""
    stages_ = stages()
    planner, dropped = AutoPlanner(stages_, RESUME_K, K_MAX), Plan(1, 0, 0.0)
    probed, _ = spell(planner.probe, stages_, drop(planner.probe, stages_, Plan(1, RESUME_K, 0.0)))
    assert measure(planner.probe, stages_, probed, alpha=0.8, cost=6.0).k == 0, "premise: the probe failed at 4"
    assert all(next_plan(stages_, dropped, n, K_MAX, resume_k=RESUME_K).k for n in (1, SEQUENCES)), \
        "premise: the policy wants to resume at 4 and at 1"

    def plan(sequences: int) -> Plan:
        return planner.next(dropped, sequences, speculating=True, backlog=lambda: BACKLOG)

    for _ in range(3):
        assert plan(SEQUENCES) == dropped
        planner.price(1, 0, SEQUENCES, drafted=0, draft_ms=0.0, verify_ms=round_ms(stages_), beside=False)
    assert plan(SEQUENCES) == dropped, "at the failed probe's load, only a probe resumes"
    assert plan(1) == dropped, "the load fell to 1: resuming there waits a round"
    planner.price(1, 0, 1, drafted=0, draft_ms=0.0, verify_ms=37.0, beside=False)
    assert plan(1).k == RESUME_K
