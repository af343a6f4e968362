"""Moving k only on a measured gain.

The stage model's predicted rate is flat in k near its optimum, and its cost side errs by more than that
flatness (verify costs at untried lengths are extrapolated from calibration), so steps taken on
prediction alone random-walked k from 4 to 7 at C = 32 and lost 11 %. Here a step the model proposes is
a trial: each k is judged by

    tokens per device ms  =  tokens per sequence round at k  /  device ms per sequence round at k

where the cost is timed over the rounds run at that k, and the tokens come from the acceptance curve
measured (StageModel.tokens_per_round). Judging both k on one curve pairs them: the
acceptance noise of any one window (about 45 % a sequence round) falls on both alike, and only the
cost, which varies a few percent, is compared. A step is kept if it measures better by a margin; a
step that does not pay is undone and not tried again for a while.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from services.router.policy import Plan

log = logging.getLogger(__name__)

TokensPerRound = Callable[[int], float]


@dataclass
class CostWindow:
    """Device time per sequence round over recent lane rounds at one layout and k (all of them when `add`'s limit
    is inf)."""

    lanes: int
    k: int
    sequences: int  # in flight when the window opened: a cost only compares with one at a similar load
    ms: float = 0.0
    rounds: float = 0.0  # sequence rounds
    lane_rounds: float = 0.0
    plain: float = 0.0  # of `rounds`, those that drafted nothing (a completion's last token, a refused draft)

    def add(self, sequences: int, ms: float, limit: float, plain: int = 0) -> None:
        if self.rounds >= limit:  # halve the old rounds' weight, so the cost stays recent
            self.ms, self.rounds, self.lane_rounds, self.plain = (
                self.ms / 2, self.rounds / 2, self.lane_rounds / 2, self.plain / 2)
        self.ms += ms
        self.rounds += sequences
        self.lane_rounds += 1
        self.plain += plain

    def rate(self, tokens_per_round: TokensPerRound) -> float:
        """Tokens per ms of device time at this window's k (a sequence round that drafted nothing makes one)."""
        tokens = tokens_per_round(self.k) * (self.rounds - self.plain) + self.plain
        return tokens / self.ms if self.ms > 0 else 0.0

    def full(self, rounds: int, lane_rounds: int) -> bool:
        return self.rounds >= rounds and self.lane_rounds >= lane_rounds

    def comparable(self, sequences: int, tolerance: float = 0.25) -> bool:
        return abs(sequences - self.sequences) <= tolerance * max(1, self.sequences)


@dataclass
class KTrial:
    """Gates the k steps of `next_plan` on measured cost; layout switches pass straight through."""

    tokens_per_round: TokensPerRound
    window: int = 64  # sequence rounds timed on each side of a step ...
    lane_window: int = 8  # ... and lane rounds, so a large batch still averages several forwards
    margin: float = 1.02  # a step must measure at least this much better than the rounds before it
    hold: int = 1024  # sequence rounds before a step that did not pay is tried again
    measured: CostWindow | None = None
    base: CostWindow | None = None  # the rounds before the step now on trial (None: no trial)
    blocked: dict[tuple[int, int], float] = field(default_factory=dict)  # (from k, to k) -> until rounds
    rounds: float = 0.0  # sequence rounds seen, the clock for `blocked`

    def observe(self, lanes: int, k: int, sequences: int, ms: float, plain: int = 0) -> None:
        """One lane round of `sequences` (`plain` of them drafted nothing) at (lanes, k) took `ms` of device time
        (the slower stage when the other lane overlaps it, else draft plus verify)."""
        self.rounds += sequences
        window = self.measured
        if window is not None and (window.lanes, window.k) == (lanes, k):
            window.add(sequences, ms, limit=4 * self.window, plain=plain)

    def decide(self, current: Plan, wanted: Plan, sequences: int) -> Plan:
        """The plan to run: `wanted` when it changes the layout or turns speculation off or on, else a k step on
        trial or `current`."""
        window = self.measured
        jump = (wanted.k == 0) != (current.k == 0)  # speculation off or back on: a switch, not a k step
        if window is None or (window.lanes, window.k) != (current.lanes, current.k) or wanted.lanes != current.lanes \
                or jump:
            plan = wanted if wanted.lanes != current.lanes or jump else current
            self._restart(plan, sequences)
            return plan
        if not window.comparable(sequences):  # the load moved: neither cost says anything about the other
            return self._abandon(current, sequences)
        if self.base is not None:
            return self._judge(current, sequences)
        if wanted.k == current.k or not window.full(self.window, self.lane_window) or self.rounds < self.blocked.get(
                (current.k, wanted.k), 0.0):
            return current
        self.base = window
        self.measured = CostWindow(current.lanes, wanted.k, sequences)
        return wanted

    def _judge(self, current: Plan, sequences: int) -> Plan:
        base, trial = self.base, self.measured
        if not trial.full(self.window, self.lane_window):
            return current
        self.base = None
        base_rate, trial_rate = base.rate(self.tokens_per_round), trial.rate(self.tokens_per_round)
        kept = trial_rate >= self.margin * base_rate
        log.info("k %d -> %d: %.2f vs %.2f tokens per s of device time at %d sequences (%.0f vs %.0f ms a "
                 "sequence round): %s", base.k, trial.k, trial_rate * 1e3, base_rate * 1e3, sequences,
                 trial.ms / trial.rounds, base.ms / base.rounds, "kept" if kept else "undone")
        if kept:
            return current
        self.blocked[(base.k, trial.k)] = self.rounds + self.hold
        self._restart(Plan(current.lanes, base.k, 0.0), sequences)
        return Plan(current.lanes, base.k, 0.0)

    def _abandon(self, current: Plan, sequences: int) -> Plan:
        """Back to the k before any step on trial, timed afresh at the new load."""
        plan = Plan(current.lanes, self.base.k, 0.0) if self.base is not None else current
        self._restart(plan, sequences)
        return plan

    def _restart(self, plan: Plan, sequences: int) -> None:
        self.base = None
        self.measured = CostWindow(plan.lanes, plan.k, sequences)
