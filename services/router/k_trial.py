"""Moving k only on a measured gain.

The stage model's predicted rate is flat in k near its optimum, and its error is larger than that
flatness (it leaves prefill out; its absolute rates were 2–3x the measured ones at C = 32), so steps
taken on prediction alone random-walked k from 4 to 7 and lost 11 % there. Here a step the model
proposes is a trial: the rounds at the new k are timed, and the step is kept only if they produce more
tokens per millisecond of device time than the rounds just before it at the old k. A step that does not
pay is undone, and that step is not tried again for a while.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.router.policy import Plan

log = logging.getLogger(__name__)


@dataclass
class RateWindow:
    """Tokens per millisecond of device time over recent lane rounds at one layout and k."""

    lanes: int
    k: int
    sequences: int  # in flight when the window opened: a rate only compares with one at a similar load
    tokens: float = 0.0
    ms: float = 0.0
    rounds: float = 0.0  # sequence rounds

    def add(self, sequences: int, tokens: int, ms: float, limit: float) -> None:
        if self.rounds >= limit:  # halve the old rounds' weight, so the rate stays recent
            self.tokens, self.ms, self.rounds = self.tokens / 2, self.ms / 2, self.rounds / 2
        self.tokens += tokens
        self.ms += ms
        self.rounds += sequences

    @property
    def rate(self) -> float:
        return self.tokens / self.ms if self.ms > 0 else 0.0

    def comparable(self, sequences: int, tolerance: float = 0.25) -> bool:
        return abs(sequences - self.sequences) <= tolerance * max(1, self.sequences)


@dataclass
class KTrial:
    """Gates the k steps of `next_plan` on measured throughput; layout switches pass straight through."""

    window: int = 256  # sequence rounds measured on each side of a step (16 lane rounds at C = 32)
    margin: float = 1.02  # a step must measure at least this much better than the rounds before it
    hold: int = 2048  # sequence rounds before a step that did not pay is tried again
    measured: RateWindow | None = None
    base: RateWindow | None = None  # the rounds before the step now on trial (None: no trial)
    blocked: dict[tuple[int, int], float] = field(default_factory=dict)  # (from k, to k) -> until rounds
    rounds: float = 0.0  # sequence rounds seen, the clock for `blocked`

    def observe(self, lanes: int, k: int, sequences: int, tokens: int, ms: float) -> None:
        """One lane round of `sequences` at (lanes, k) gained `tokens` for `ms` of device time (the slower
        stage when the other lane overlaps it, else draft plus verify)."""
        self.rounds += sequences
        window = self.measured
        if window is not None and (window.lanes, window.k) == (lanes, k):
            window.add(sequences, tokens, ms, limit=2 * self.window)

    def decide(self, current: Plan, wanted: Plan, sequences: int) -> Plan:
        """The plan to run: `wanted` when it changes the layout, else a k step on trial or `current`."""
        window = self.measured
        if window is None or (window.lanes, window.k) != (current.lanes, current.k) or wanted.lanes != current.lanes:
            plan = wanted if wanted.lanes != current.lanes else current
            self._restart(plan, sequences)
            return plan
        if not window.comparable(sequences):  # the load moved: neither rate says anything about the other
            return self._abandon(current, sequences)
        if self.base is not None:
            return self._judge(current, sequences)
        if wanted.k == current.k or window.rounds < self.window or self.rounds < self.blocked.get(
                (current.k, wanted.k), 0.0):
            return current
        self.base = window
        self.measured = RateWindow(current.lanes, wanted.k, sequences)
        return wanted

    def _judge(self, current: Plan, sequences: int) -> Plan:
        base, trial = self.base, self.measured
        if trial.rounds < self.window:
            return current
        self.base = None
        kept = trial.rate >= self.margin * base.rate
        log.info("k %d -> %d: %.2f vs %.2f tokens per s of device time at %d sequences: %s", base.k, trial.k,
                 trial.rate * 1e3, base.rate * 1e3, sequences, "kept" if kept else "undone")
        if kept:
            return current
        self.blocked[(base.k, trial.k)] = self.rounds + self.hold
        self._restart(Plan(current.lanes, base.k, 0.0), sequences)
        return Plan(current.lanes, base.k, 0.0)

    def _abandon(self, current: Plan, sequences: int) -> Plan:
        """Back to the k before any step on trial, measured afresh at the new load."""
        plan = Plan(current.lanes, self.base.k, 0.0) if self.base is not None else current
        self._restart(plan, sequences)
        return plan

    def _restart(self, plan: Plan, sequences: int) -> None:
        self.base = None
        self.measured = RateWindow(plan.lanes, plan.k, sequences)
