"""auto resumes speculating only once the policy has wanted it across a lane round (AutoPlanner._held): a load dip
shorter than a round must not re-send the draft every sequence's backlog for one round."""

from services.router.auto_plan import AutoPlanner
from services.router.policy import Plan, next_plan
from tests.test_policy import model
from tests.test_probe import BACKLOG, K_MAX, RESUME_K, SEQUENCES


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
