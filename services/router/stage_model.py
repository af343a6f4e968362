"""What auto's policy knows: measured stage costs (a draft step, a verify) and how far acceptance reaches.

Kept apart from the planning (`policy.py`), which only reads these estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.router.stage_costs import Pace, StageCosts

MAX_POSITIONS = 32
MIN_POSITION_SAMPLES = 8
MIN_ROUNDS_TO_REPLAN = 64  # sequence rounds of measured acceptance before the plan leaves its start
# Sequence rounds of measured acceptance before a jump to or from target-only is judged on it (policy.jump_gain),
# fewer than MIN_ROUNDS_TO_REPLAN: whether drafting pays at all shows sooner than which k is best
MIN_ROUNDS_TO_JUMP = 16
# Until a jump's worth of rounds is measured (MIN_ROUNDS_TO_JUMP; again after a probe's discount), acceptance
# is measured past a completion's first tokens (a quarter of its max_tokens when that is fewer): they are accepted
# less often than the rest (the default pair on the HumanEval prompts: α 0.66 over the first 12 tokens, 0.79 over
# 64), and early in a run they alone made drafting look far dearer than it was: auto dropped to target-only where
# sd was ahead (on the AMX CPU at C = 4: α 0.45 over those rounds, 0.78 in sd). From then on every round counts,
# since throughput sees whole completions (counting only later tokens would overrate drafting ~8 % for good).
SETTLE_TOKENS = 16
# Where completions end before they settle (short answers), their first tokens are all there is: held out, they
# left acceptance at its prior for good. Once this many more ended unsettled than settled, every round counts.
SHORT_COMPLETIONS = 8
# The tokens a completion makes where it may end on its own (EOS, a stop), until some have: the router's default
# max_tokens (a prior worth one completion).
NATURAL_LENGTH_PRIOR = 256.0


def settled(generated: int, max_tokens: int) -> bool:
    """Whether a round after `generated` tokens of a completion of up to `max_tokens` measures acceptance."""
    return generated >= min(SETTLE_TOKENS, max_tokens // 4)


@dataclass
class StageModel:
    """Live estimates of one draft step t_d(B), one verify t_v(B, k), the acceptance rate α, and how far
    into a round acceptance reaches: survival[i] / reached[i] = P(the first i drafts are all accepted).

    Stage costs are kept twice when draft and target share one host's cores: `alone` (a call that had every
    core, as in one lane) and `shared` (half of them, while the other service ran too, as in two lanes).
    Without sharing every call counts as alone, and two lanes read the same costs. Calibration's calls are
    read at the host's pace (stage_costs.py): how much slower live calls run than calibration measured."""

    alone: StageCosts = field(default_factory=StageCosts)
    shared: StageCosts = field(default_factory=StageCosts)
    # A prior worth 20 drafted tokens at α = 0.7, so a few early rounds cannot swing the plan.
    drafted: float = 20.0
    accepted: float = 14.0
    reached: list[float] = field(default_factory=lambda: [0.0] * (MAX_POSITIONS + 1))
    survived: list[float] = field(default_factory=lambda: [0.0] * (MAX_POSITIONS + 1))
    drafted_to: list[float] = field(default_factory=lambda: [0.0] * (MAX_POSITIONS + 1))
    rounds: int = 0  # sequence rounds measured (with at least one draft) since acceptance was last discounted
    short_endings: int = 0  # completions that ended before settling, net of those that settled (capped)
    lane_capacity: int = 0  # the most sequences a lane holds (the router's --max-batch; 0: no bound)
    # The draft's own prefill of new prompts (a cost only speculation pays), decayed over prompts; and to spread it
    # over the tokens a completion makes (`completion_length`): the max_tokens of the requests in flight (auto's
    # scheduler sets them before each plan), and how long completions that ended on their own ran (decayed).
    prompt_prefill_ms: float = 0.0
    prompts_prefilled: float = 0.0
    asked: list[int] = field(default_factory=list)
    natural_tokens: float = NATURAL_LENGTH_PRIOR
    natural_endings: float = 1.0
    # Every token the draft was sent (prompts, and the tokens it missed), decayed: what re-sending costs.
    draft_sent_ms: float = 0.0
    draft_sent_tokens: float = 0.0
    pace: Pace = field(default_factory=Pace)  # the host's speed, read into calibration's share of each cost

    def served(self, sequences: int, lanes: int) -> int:
        """Of `sequences` in flight, how many one lane, or two (`lanes` = 2), hold at once."""
        return min(sequences, self.lane_capacity * (2 if lanes == 2 else 1)) if self.lane_capacity else sequences

    def costs(self, shared: bool) -> StageCosts:
        wanted, other = (self.shared, self.alone) if shared else (self.alone, self.shared)
        return wanted if wanted.known else other

    def observe_propose(self, batch: int, steps: int, ms: float, shared: bool = False, paced: bool = True) -> None:
        """A propose of `batch` sequences that ran `steps` draft steps (its longest proposal); `paced`: it
        measures the host's pace (False: start-up calibration)."""
        if steps > 0:
            (self.shared if shared else self.alone).draft_step.observe(batch, ms / steps, self.pace, paced)

    def observe_verify(self, batch: int, k: int, ms: float, shared: bool = False, paced: bool = True) -> None:
        """A verify of `batch` sequences carrying at most k drafts each."""
        (self.shared if shared else self.alone).verify.observe(batch, k, ms, self.pace, paced)

    def draft_step(self, batch: float, shared: bool = False) -> float:
        return self.costs(shared).draft_step(batch, self.pace)

    def verify(self, batch: float, k: float, shared: bool = False) -> float:
        return self.costs(shared).verify(batch, k, self.pace)

    def observe_acceptance(self, drafted: int, accepted: int, decay: float = 0.99) -> None:
        if not drafted:  # a round without drafts says nothing (and ~74k of them decayed α to 0 / 0)
            return
        self.drafted = decay * self.drafted + drafted
        self.accepted = decay * self.accepted + accepted

    def observe_round(self, drafted: int, accepted: int, cap: int | None = None, measures: bool = True,
                      decay: float = 0.998) -> None:
        """One sequence's round: `drafted` proposals of at most `cap` asked for (default: drafted; fewer when
        the draft stopped early, `--draft-stop-below`), the first `accepted` of them kept. `measures` False (a
        round among a completion's first tokens: `settled`): not counted.

        Positions count as reached up to the cap, so survived[i] / reached[i] is P(the first i accepted) for a
        round that may draft i, an early stop included; drafted_to[i] / reached[i] is P(it drafts the i-th)."""
        if not measures:
            return
        cap = drafted if cap is None else max(cap, drafted)
        self.rounds += drafted > 0
        for i in range(1, MAX_POSITIONS + 1):
            self.reached[i] *= decay
            self.survived[i] *= decay
            self.drafted_to[i] *= decay
        for i in range(1, min(cap, MAX_POSITIONS) + 1):
            self.reached[i] += 1
            self.survived[i] += i <= accepted
            self.drafted_to[i] += i <= drafted

    def measures(self, generated: int, max_tokens: int) -> bool:
        """Whether a round after `generated` tokens of a completion of up to `max_tokens` measures acceptance."""
        return self.rounds >= MIN_ROUNDS_TO_JUMP or self.short_endings >= SHORT_COMPLETIONS or \
            settled(generated, max_tokens)

    def completed(self, generated: int, max_tokens: int, natural: bool, drafted: bool, decay: float = 0.9) -> None:
        """A completion ended after `generated` tokens: on its own (`natural`: EOS or a stop) or at max_tokens;
        `drafted`: it speculated (whether it settled counts only then: `short_endings`)."""
        if drafted:
            step = -1 if settled(generated, max_tokens) else 1
            self.short_endings = min(SHORT_COMPLETIONS, max(0, self.short_endings + step))
        if natural:
            self.natural_tokens = decay * self.natural_tokens + generated
            self.natural_endings = decay * self.natural_endings + 1

    def draft_steps(self, k: int, sequences: float = 1) -> float:
        """Expected draft steps of a round asking k of each of `sequences` — also its longest proposal: a step
        runs while any of them still drafts (measured per position, the last measure carried past the data;
        without early stops, k)."""
        steps, each = 0.0, 1.0
        for i in range(1, k + 1):
            if self.reached[i] >= MIN_POSITION_SAMPLES:
                each = self.drafted_to[i] / self.reached[i]
            steps += 1 - (1 - each) ** max(1.0, sequences)
        return steps

    def observe_draft_prefill(self, ms: float, prompts: int, decay: float = 0.9) -> None:
        """The draft cached `prompts` new prompts at a cost of `ms` to the rounds (0 where it ran beside the target's
        prefill), decayed per prompt."""
        self.prompt_prefill_ms = decay ** prompts * self.prompt_prefill_ms + ms
        self.prompts_prefilled = decay ** prompts * self.prompts_prefilled + prompts

    @property
    def completion_length(self) -> float:
        """Tokens a completion is expected to make: over the requests in flight, the lesser of what each asks at
        most and how long completions that ended on their own ran. Completions cut at max_tokens say only what they
        asked, so answers of 4 tokens (a warm-up) do not price the 64-token ones after them at 4 (nor, as a
        history of asks would, at half of 64 for a wave), and one that asked far more than the rest moves only its
        own term."""
        natural = self.natural_tokens / self.natural_endings
        return sum(min(ask, natural) for ask in self.asked) / len(self.asked) if self.asked else natural

    def observe_draft_sent(self, tokens: int, ms: float, decay: float = 0.9) -> None:
        """A draft prefill of `tokens` that took `ms` (decayed fast: the last few calls price a re-send)."""
        self.draft_sent_tokens = decay * self.draft_sent_tokens + tokens
        self.draft_sent_ms = decay * self.draft_sent_ms + ms

    @property
    def draft_ms_per_token(self) -> float | None:
        """ms the draft takes to cache a token it is sent (None: it has not been sent any)."""
        return self.draft_sent_ms / self.draft_sent_tokens if self.draft_sent_tokens > 0 else None

    def discount_acceptance(self, keep: float) -> None:
        """Weighs the acceptance measured so far by `keep` and counts its rounds afresh, so that what is measured
        next decides (a probe after target-only decoding: probe.py)."""
        for table in (self.reached, self.survived, self.drafted_to):
            table[:] = [keep * value for value in table]
        self.drafted, self.accepted = keep * self.drafted, keep * self.accepted
        self.rounds = 0

    def draft_prefill_per_round(self, k: int) -> float:
        """ms of draft prefill a sequence round of k drafts carries. A prompt's prefill is paid once for all of its
        completion's rounds, so it is spread over the tokens a completion makes (`completion_length`), a round's
        share being the tokens it makes. Spread over a fixed count of rounds it erred either way: over 16, auto
        dropped to target-only at C = 4 on the AMX CPU, where sd was 1.14x ar; over those run plus 64, a
        ten-second run charged about half of each 136 ms prefill of the Zen 5 EPYC's 64-token completions, and
        auto speculated at C = 4, where ar was 1.2x sd."""
        if self.prompts_prefilled <= 0:
            return 0.0
        return self.prompt_prefill_ms / self.prompts_prefilled * self.tokens_per_round(k) / max(
            1.0, self.completion_length)

    def tokens_per_round(self, k: int) -> float:
        """Expected tokens one sequence gains from a round of k drafts: 1 + Σ P(first i accepted).

        Measured per position where there is data. Acceptance is bursty (code: long runs of easy tokens),
        so this is usually well above the i.i.d. (1 − α^(k+1)) / (1 − α); past the data it continues
        geometrically with α.
        """
        total, survival = 1.0, 1.0
        for i in range(1, k + 1):
            measured = self.survived[i] / self.reached[i] if self.reached[i] >= MIN_POSITION_SAMPLES else None
            survival = min(survival, measured) if measured is not None else survival * self.alpha
            total += survival
        return total

    @property
    def alpha(self) -> float:
        return min(0.99, self.accepted / self.drafted)

    @property
    def known(self) -> bool:
        return self.alone.known or self.shared.known
