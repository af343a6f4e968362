"""Speculating again after a spell of target-only decoding, to measure acceptance afresh.

Target-only rounds measure no acceptance, so a drop judged on rounds that were not typical would stand for
good: a completion's first tokens are accepted less often than the rest (the default pair on the HumanEval
prompts at C = 4: α 0.66 over the first 12 tokens, 0.79 over 64), and on the AMX CPU auto dropped after a few
rounds at C = 4, where sd measured 1.07x target-only, and never came back (0.88x sd). So after a spell the
plan speculates again, a probe, with the acceptance measured before it cut to at most half the weight of the
probe's own first rounds (the stage model goes on from there if the probe holds).

A probe costs what re-sending the draft the tokens it missed takes, and its rounds, priced at what the model
predicts speculating costs (a round of k drafts costs several target-only ones). A probe runs MIN_ROUNDS_TO_JUMP
sequence rounds (besides each lane's first, which also re-sends the draft what it missed) and is judged on what they
measured, not on the stage model: speculating goes on if its tokens per ms of device time beat target-only's
at that load (measured over the spell's rounds at it where enough ran), and the model may drop it again only
once it has measured MIN_ROUNDS_TO_REPLAN rounds (else a kept probe was undone on the spot, and probe and drop
took turns with no backoff; a drop within HELD_ROUNDS of it still counts as a failed probe for the backoff).
(The model can be optimistic: on the Zen 5 EPYC at C = 4 it predicted speculating level with target-only,
which measured 1.2x sd.) A spell lasts PROBE_RATIO times that, doubled for each probe in a row that ended in
a drop again, so probing costs a few percent where target-only is right. Where the stale estimate has
target-only ahead by PROBE_WITHIN or more (at high load it wins by 1.3-1.5x), no probe runs: a few rounds'
acceptance is not that far off; the spell starts over, and the check recurs as the load moves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from services.router.k_trial import CostWindow
from services.router.policy import MIN_ROUNDS_TO_JUMP, Plan, best_plan, predicted_rate, sequence_round_ms
from services.router.stage_model import MIN_ROUNDS_TO_REPLAN, StageModel

log = logging.getLogger(__name__)

PROBE_RATIO = 4.0  # a spell's device time over the probe's cost (times 2 for each failed probe in a row)
PROBE_WITHIN = 1.25  # no probe where the stale estimate has target-only ahead by this much or more
STALE_ROUNDS = MIN_ROUNDS_TO_JUMP / 2  # the most sequence rounds' weight acceptance from before a probe keeps
HELD_ROUNDS = 2 * MIN_ROUNDS_TO_REPLAN  # sequence rounds a kept probe speculates before a drop is not its failure
MAX_DOUBLINGS = 8  # a spell grows to at most 256x its probe's cost: traffic may still change
UNBOUNDED = float("inf")  # a spell's and a probe's tallies keep every round (unlike KTrial's windows, which halve)


def _target_only_window() -> CostWindow:
    return CostWindow(lanes=1, k=0, sequences=0)


@dataclass
class Probe:
    spell: CostWindow = field(default_factory=_target_only_window)  # target-only rounds since the drop or probe
    by_load: dict[int, CostWindow] = field(default_factory=dict)  # target-only lane rounds, by sequences in one
    failed_in_a_row: int = 0  # probes that ended in a drop again
    probing: bool = False
    alone_rate: float = 0.0  # target-only tokens per device ms at the load the probe ran at (_alone_rate)
    probed: CostWindow | None = None  # the probe's rounds
    loads: float = 0.0  # the sequences in flight at each of the probe's round boundaries, summed ...
    load_checks: int = 0  # ... over this many: their mean is the load the probe is judged at
    skip_rounds: int = 0  # lane rounds still to leave out (each lane's first re-sends what the draft missed)
    failed_at: int = 0  # sequences in flight when the last probe measured speculating behind
    kept: bool = False  # the last probe measured speculating ahead: held until acceptance is well measured
    speculated: float = 0.0  # sequence rounds speculated since the spell or the kept probe

    def observe(self, lanes: int, k: int, sequences: int, ms: float, plain: int = 0) -> None:
        """One lane round of `sequences` (`plain` of them drafted nothing) at (lanes, k) took `ms` of device
        time."""
        if k == 0:
            self.spell.add(sequences, ms, limit=UNBOUNDED)
            if lanes == 1:  # beside another lane a verify may run on fewer cores: not what target-only costs
                window = self.by_load.setdefault(sequences, CostWindow(lanes=1, k=0, sequences=sequences))
                window.add(sequences, ms, limit=MIN_ROUNDS_TO_REPLAN)
        elif self.probing and self.skip_rounds:
            self.skip_rounds -= 1
        elif self.probing:
            self.probed.add(sequences, ms, limit=UNBOUNDED, plain=plain)
        else:
            self.speculated += sequences

    def revise(self, model: StageModel, current: Plan, wanted: Plan, sequences: int, k_max: int, resume_k: int,
               backlog: Callable[[], int]) -> Plan:
        """`wanted` (the policy's next plan), or a probe at `resume_k` once a spell of target-only has run;
        `backlog()`: the tokens the draft would be sent first (drafting.draft_backlog)."""
        if self.probing and current.k:
            self.loads, self.load_checks = self.loads + sequences, self.load_checks + 1
            if self.probed.rounds < MIN_ROUNDS_TO_JUMP:  # not before it has measured
                return current
            if not self._speculating_paid(model, current):
                self.failed_in_a_row = min(self.failed_in_a_row + 1, MAX_DOUBLINGS)
                self._begin_spell()
                self.failed_at = sequences
                return Plan(1, 0, self.alone_rate * 1e3)
            self.kept, self.speculated = True, 0.0
        if current.k and not wanted.k and self.kept and model.rounds < MIN_ROUNDS_TO_REPLAN:
            return current  # what the probe measured outranks the model until the model has measured more
        if current.k and not wanted.k:  # a drop: a spell begins, timed afresh (older target-only rounds are stale)
            if self.kept:  # the model, once it measured enough, undid a kept probe: it failed, if later
                self.failed_in_a_row, self.failed_at = min(self.failed_in_a_row + 1, MAX_DOUBLINGS), sequences
            self._begin_spell()
            self.by_load.clear()
            return wanted
        if current.k and model.rounds >= MIN_ROUNDS_TO_REPLAN and (not self.kept or self.speculated >= HELD_ROUNDS):
            self.probing, self.failed_in_a_row, self.kept = False, 0, False  # speculating has held up
        held = abs(sequences - self.failed_at) <= self.failed_at / 4  # a load like the one it failed at
        if not current.k and wanted.k and self.failed_in_a_row and held:
            wanted = current  # at this load a probe measured speculating behind: only a probe undoes that
        if current.k or wanted.k or sequences <= 0 or not model.known:
            return wanted
        probe = best_plan(model, sequences, k_max, ks=range(resume_k, resume_k + 1))
        if not self._due(model, probe, sequences, backlog()):
            return wanted
        self._begin_spell()
        alone = predicted_rate(model, sequences, 1, 0)
        if alone >= PROBE_WITHIN * probe.tokens_per_s:
            log.debug("no probe at %d sequences: target-only predicted %.2f tokens/s, speculating %.2f", sequences,
                      alone, probe.tokens_per_s)
            return wanted
        log.info("probe at %d sequences: speculating again at k=%d to measure acceptance afresh (%.2f tokens/s "
                 "predicted on the stale estimate, %.2f target-only)", sequences, resume_k, probe.tokens_per_s, alone)
        model.discount_acceptance(min(1.0, STALE_ROUNDS / max(model.reached[1], 1.0)))
        self.probing, self.loads, self.load_checks = True, float(sequences), 1
        self.probed, self.skip_rounds = CostWindow(probe.lanes, probe.k, sequences), probe.lanes
        return probe

    def _begin_spell(self) -> None:
        self.probing, self.kept, self.spell, self.speculated = False, False, _target_only_window(), 0.0

    def _alone_rate(self, model: StageModel, sequences: int) -> float:
        """Target-only tokens per device ms at this load: measured, where enough of the spell's rounds ran at it;
        else the model's (its target-only cost is what every target-only round measures). A spell's rate pooled
        over loads would judge a probe at 2 sequences against batches of 16, which decode far more per ms. A
        target-only round holds at most a lane's capacity, so that is the load looked up beyond it."""
        load = model.served(sequences, 1)
        near = [w for w in self.by_load.values() if w.comparable(load) and w.rounds >= MIN_ROUNDS_TO_JUMP]
        if near:  # the nearest size that ran enough (a lane may run below its capacity, or above it for a while)
            return min(near, key=lambda w: abs(w.sequences - load)).rate(model.tokens_per_round)
        return predicted_rate(model, sequences, 1, 0) / 1e3

    def _speculating_paid(self, model: StageModel, current: Plan) -> bool:
        """Ends the probe: whether its rounds made more tokens per device ms than target-only does at the load they
        ran at, the mean of the sequences in flight at its round boundaries (a probe begun as a wave drained, at 1
        sequence, whose rounds then ran at 4, would be judged against target-only at 1, a third of 4's rate, and
        kept where it lost)."""
        self.probing = False
        load = max(1, round(self.loads / max(self.load_checks, 1)))
        self.alone_rate = self._alone_rate(model, load)
        rate = self.probed.rate(model.tokens_per_round)
        log.info("probe ran at ~%d sequences, k=%d: %.2f tokens per s of device time against %.2f target-only: %s",
                 load, current.k, rate * 1e3, self.alone_rate * 1e3, "kept" if rate >= self.alone_rate else
                 "dropped")
        return rate >= self.alone_rate

    def _due(self, model: StageModel, probe: Plan, sequences: int, backlog_tokens: int) -> bool:
        """Whether the spell has run PROBE_RATIO times (doubled per failed probe) the probe's predicted device time:
        re-sending the draft the tokens it missed, and MIN_ROUNDS_TO_JUMP sequence rounds at the probe's own
        predicted cost, and each lane's first round, left out of the judging, as well. (Priced at the spell's
        target-only pace instead, its rounds were costed at a quarter of what they ran at C = 4 on the Zen 5 EPYC:
        15 ms a sequence round, where a lane round of 4 drafts for 4 sequences took about 245.)"""
        per_token, spell = model.draft_ms_per_token, self.spell
        if per_token is None or spell.rounds <= 0 or spell.ms <= 0:
            return False
        skipped = model.served(sequences, probe.lanes)
        rounds_ms = (MIN_ROUNDS_TO_JUMP + skipped) * sequence_round_ms(model, sequences, probe.lanes, probe.k)
        return spell.ms >= PROBE_RATIO * 2 ** self.failed_in_a_row * (backlog_tokens * per_token + rounds_ms)
