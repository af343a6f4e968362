"""Speculating again after a spell of target-only decoding, to measure acceptance afresh.

Target-only rounds measure no acceptance, so a drop judged on rounds that were not typical would stand for
good: a completion's first tokens are accepted less often than the rest (the default pair on the HumanEval
prompts at C = 4: α 0.66 over the first 12 tokens, 0.79 over 64), and on the AMX CPU auto dropped after a few
rounds at C = 4, where sd measured 1.07x target-only, and never came back (0.88x sd). So after a spell the
plan speculates again, a probe, and the acceptance measured before it weighs a quarter: the drop is judged
again on the probe's own rounds (MIN_ROUNDS_TO_JUMP of them, policy.jump_gain).

A probe costs what re-sending the draft the tokens it missed takes, and its rounds, which may run slower
than target-only would. A spell lasts PROBE_RATIO times that, doubled for each probe in a row that ended in
a drop again, so probing costs a few percent where target-only is right. Where the stale estimate has
target-only ahead by PROBE_WITHIN or more (at high load it wins by 1.3-1.5x), no probe runs: a few rounds'
acceptance is not that far off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from services.router.policy import MIN_ROUNDS_TO_JUMP, Plan, best_plan, predicted_rate
from services.router.request import Request
from services.router.stage_model import StageModel

log = logging.getLogger(__name__)

PROBE_RATIO = 4.0  # a spell's device time over the probe's cost (times 2 for each failed probe in a row)
PROBE_WITHIN = 1.25  # no probe where the stale estimate has target-only ahead by this much or more
KEEP_ON_PROBE = 0.25  # the weight acceptance measured before a probe keeps
MAX_DOUBLINGS = 8


def draft_backlog(requests: Iterable[Request], epoch: int) -> int:
    """Tokens the draft would have to be sent before these requests could speculate again."""
    return sum(len(r.tokens) - (r.draft_len if r.draft_epoch == epoch else 0) for r in requests)


@dataclass
class Probe:
    spell_ms: float = 0.0  # device time of the target-only rounds since the drop (or the last probe)
    spell_rounds: float = 0.0  # and their sequence rounds
    failed: int = 0  # probes in a row that ended in a drop
    probing: bool = False

    def observe(self, k: int, sequences: int, ms: float) -> None:
        """One lane round of `sequences` at k drafts a round took `ms` of device time."""
        if k == 0:
            self.spell_ms += ms
            self.spell_rounds += sequences

    def revise(self, model: StageModel, current: Plan, wanted: Plan, sequences: int, k_max: int, resume_k: int,
               backlog_tokens: int) -> Plan:
        """`wanted` (the policy's next plan), or a probe at `resume_k` once a spell of target-only has run."""
        if current.k and not wanted.k:  # a drop: a spell begins
            if self.probing:
                self.failed = min(self.failed + 1, MAX_DOUBLINGS)
            self.probing, self.spell_ms, self.spell_rounds = False, 0.0, 0.0
            return wanted
        if self.probing and model.rounds >= MIN_ROUNDS_TO_JUMP:  # it measured enough and still speculates
            self.probing, self.failed = False, 0
        if current.k or wanted.k or not self._due(model, backlog_tokens):
            return wanted
        self.spell_ms, self.spell_rounds = 0.0, 0.0
        probe = best_plan(model, sequences, k_max, ks=range(resume_k, resume_k + 1))
        alone = predicted_rate(model, sequences, 1, 0)
        if alone >= PROBE_WITHIN * probe.tokens_per_s:
            self.failed = min(self.failed + 1, MAX_DOUBLINGS)
            return wanted
        log.info("probe at %d sequences: speculating again at k=%d to measure acceptance afresh (%.2f tokens/s "
                 "predicted on the stale estimate, %.2f target-only)", sequences, resume_k, probe.tokens_per_s, alone)
        model.discount_acceptance(KEEP_ON_PROBE)
        self.probing = True
        return probe

    def _due(self, model: StageModel, backlog_tokens: int) -> bool:
        per_token = model.draft_ms_per_token
        if per_token is None or self.spell_rounds <= 0:
            return False
        probe_ms = backlog_tokens * per_token + MIN_ROUNDS_TO_JUMP * self.spell_ms / self.spell_rounds
        return self.spell_ms >= PROBE_RATIO * 2 ** self.failed * probe_ms
