"""auto's plan for the sequences in flight: one lane or two, and k drafts a round (0: target-only).

Three steps, each in its own file: the policy picks the plan its stage model predicts fastest (policy.py);
after a spell of target-only decoding a probe speculates again, to measure acceptance afresh (probe.py); a
k step is kept only when it measures a gain (k_trial.py)."""

from __future__ import annotations

from collections.abc import Callable

from services.router import policy
from services.router.k_trial import KTrial
from services.router.policy import Plan
from services.router.probe import Probe
from services.router.stage_model import StageModel


class AutoPlanner:
    """Chooses auto's plan at each lane's round boundary, and is told what each round cost."""

    def __init__(self, stages: StageModel, k: int, k_max: int) -> None:
        self.stages, self.k_max = stages, k_max
        self.resume_k = k  # the k to speculate at again after a spell of target-only decoding
        self.k_trial, self.probe = KTrial(stages.tokens_per_round), Probe()
        self.rounds_seen = 0  # lane rounds priced so far: the clock a resume waits on
        self.resume_wanted_at: int | None = None  # rounds_seen when the policy first wanted to resume, if it still does

    def next(self, current: Plan, sequences: int, speculating: bool, backlog: Callable[[], int]) -> Plan:
        """The plan for the next round of `sequences` in flight; `speculating`: the draft is serving;
        `backlog()`: the tokens the draft would be sent before speculation resumed (drafting.draft_backlog)."""
        if not speculating:  # the draft is down: when it is back, any spell (and any wish to resume) starts afresh
            self.probe, self.resume_wanted_at = Probe(), None
            return Plan(1, 0, 0.0)
        if current.k:
            self.resume_k = current.k
        wanted = policy.next_plan(self.stages, current, sequences, self.k_max, resume_k=self.resume_k)
        if self._held(current, wanted):  # not a probe either: it would resume at the same passing load
            return self.k_trial.decide(current, current, sequences)
        wanted = self.probe.revise(self.stages, current, wanted, sequences, self.k_max, self.resume_k, backlog)
        if not current.k and not wanted.k:  # kept target-only after all (a failed probe's load): the wish ends
            self.resume_wanted_at = None
        return self.k_trial.decide(current, wanted, sequences)

    def _held(self, current: Plan, wanted: Plan) -> bool:
        """Whether to hold target-only although the policy wants to resume speculating: until it has wanted that
        across a whole lane round. Resuming re-sends the draft every sequence's backlog, and a closed-loop client's
        requests end together and come back one by one: at C = 4 on the Zen 5 EPYC the first request of a new wave
        resumed speculating alone, for one 340 ms round where a target-only round took 60, before the other three
        joined and the plan dropped again."""
        if current.k or not wanted.k:
            self.resume_wanted_at = None
            return False
        if self.resume_wanted_at is None:
            self.resume_wanted_at = self.rounds_seen
        return self.rounds_seen <= self.resume_wanted_at

    def price(self, lanes: int, k: int, sequences: int, drafted: int, draft_ms: float, verify_ms: float,
              beside: bool) -> None:
        """One lane round of `sequences`, `drafted` of which were sent drafts, started at (lanes, k). Priced in
        device time, not wall time: a round's wall time also holds the other lane's prefills, which come in
        waves and would swamp a few percent. Beside the other lane a round costs its slower stage, else draft
        plus verify; one that sent no drafts (the draft went down, or had none) ran target-only and costs its
        verify alone (any draft time in it was catching the draft up)."""
        if not drafted:
            self.observe(lanes, 0, sequences, verify_ms)
        else:
            cost_ms = max(draft_ms, verify_ms) if beside else draft_ms + verify_ms
            self.observe(lanes, k, sequences, cost_ms, plain=sequences - drafted)

    def observe(self, lanes: int, k: int, sequences: int, ms: float, plain: int = 0) -> None:
        """One lane round of `sequences` (`plain` of them drafted nothing) at (lanes, k) took `ms` of device time
        (overlapped: its slower stage)."""
        self.rounds_seen += 1
        self.k_trial.observe(lanes, k, sequences, ms, plain)
        self.probe.observe(lanes, k, sequences, ms, plain)
