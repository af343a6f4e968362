"""Choosing one lane or two, and k, from measured stage times.

At N sequences, one lane (SD) costs  k·t_d(N) + N·t_p + t_v(N, k)  per cycle; two lanes (PSD) cost
2·max(k·t_d(N/2) + N/2·t_p, t_v(N/2, k)), where t_p is the draft's prefill of new prompts per sequence round
(what speculating costs beyond drafting) — on a host whose cores the two services share, with the stage costs
measured at half the cores (each stage then runs beside the other). Both cycles produce N·E[tokens per
round] (measured per draft position, see StageModel.tokens_per_round). The policy picks the layout and k
with the most tokens per second. It only decides *how* tokens are computed, never which: output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_POSITIONS = 32
MIN_POSITION_SAMPLES = 8
RESUME_GAIN = 1.25  # predicted gain that takes target-only decoding back to speculating
MIN_ROUNDS_TO_REPLAN = 64  # sequence rounds of measured acceptance before the plan leaves its start
# ... and before a jump to or from target-only is judged on measured acceptance (jump_gain): whether drafting
# pays at all shows sooner than which k is best
MIN_ROUNDS_TO_JUMP = 16
# Predicted on the prior (or a few rounds' acceptance) alone, target-only must beat speculating by this to start
# it. Here the prediction said 1.2-1.4x at C = 4, where sd measured 1.14x ar, and 1.6-2x at C = 8, where ar won.
PRIOR_DROP_GAIN = 1.5


@dataclass
class LinearCost:
    """t(B) ≈ a + b·B fitted by exponentially weighted least squares over recent observations."""

    decay: float = 0.95
    _sw: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0

    def observe(self, batch: float, ms: float) -> None:
        d = self.decay
        self._sw = d * self._sw + 1
        self._sx = d * self._sx + batch
        self._sy = d * self._sy + ms
        self._sxx = d * self._sxx + batch * batch
        self._sxy = d * self._sxy + batch * ms

    @property
    def known(self) -> bool:
        return self._sw > 0

    def __call__(self, batch: float) -> float:
        if not self.known:
            return 0.0
        mean_x, mean_y = self._sx / self._sw, self._sy / self._sw
        var = self._sxx / self._sw - mean_x * mean_x
        slope = max(0.0, (self._sxy / self._sw - mean_x * mean_y) / var) if var > 1e-9 else 0.0
        return max(1e-3, mean_y + slope * (batch - mean_x))


@dataclass
class VerifyCost:
    """t_v(B, k): one LinearCost in the batch for each draft length measured, linear in k between them.

    Verifying k drafts feeds k + 1 tokens per sequence, so the cost grows with k, but not in proportion
    (a CPU verify of 5 tokens costs 1.3x one token at batch 1, 1.7x at batch 8): measured, not modelled."""

    by_k: dict[int, LinearCost] = field(default_factory=dict)

    def observe(self, batch: float, k: int, ms: float) -> None:
        self.by_k.setdefault(k, LinearCost()).observe(batch, ms)

    @property
    def known(self) -> bool:
        return bool(self.by_k)

    def __call__(self, batch: float, k: int) -> float:
        if not self.by_k:
            return 0.0
        ks = sorted(self.by_k)
        if k in self.by_k or len(ks) == 1:
            return self.by_k[k if k in self.by_k else ks[0]](batch)
        below, above = [x for x in ks if x < k], [x for x in ks if x > k]
        # Interpolate between the nearest measured lengths; past the ends, continue the nearest two's slope.
        lo, hi = (below[-1], above[0]) if below and above else (ks[-2], ks[-1]) if below else (ks[0], ks[1])
        t_lo, t_hi = self.by_k[lo](batch), self.by_k[hi](batch)
        return max(1e-3, t_lo + (t_hi - t_lo) * (k - lo) / (hi - lo))


@dataclass
class StageCosts:
    """One draft step t_d(B) and one verify t_v(B, k), as measured under one sharing of the host's cores."""

    draft_step: LinearCost = field(default_factory=LinearCost)
    verify: VerifyCost = field(default_factory=VerifyCost)

    @property
    def known(self) -> bool:
        return self.draft_step.known and self.verify.known


@dataclass
class StageModel:
    """Live estimates of one draft step t_d(B), one verify t_v(B, k), the acceptance rate α, and how far
    into a round acceptance reaches: survival[i] / reached[i] = P(the first i drafts are all accepted).

    Stage costs are kept twice when draft and target share one host's cores: `alone` (a call that had every
    core, as in one lane) and `shared` (half of them, while the other service ran too, as in two lanes).
    Without sharing every call counts as alone, and two lanes read the same costs."""

    alone: StageCosts = field(default_factory=StageCosts)
    shared: StageCosts = field(default_factory=StageCosts)
    # A prior worth 20 drafted tokens at α = 0.7, so a few early rounds cannot swing the plan.
    drafted: float = 20.0
    accepted: float = 14.0
    reached: list[float] = field(default_factory=lambda: [0.0] * (MAX_POSITIONS + 1))
    survived: list[float] = field(default_factory=lambda: [0.0] * (MAX_POSITIONS + 1))
    rounds: int = 0  # sequence rounds observed (with at least one draft)
    # The draft's own prefill of new prompts, per sequence round (decayed alike): a cost only speculation pays.
    draft_prefill_ms: float = 0.0
    draft_prefill_rounds: float = 0.0

    def costs(self, shared: bool) -> StageCosts:
        wanted, other = (self.shared, self.alone) if shared else (self.alone, self.shared)
        return wanted if wanted.known else other

    def observe_propose(self, batch: int, k: int, ms: float, shared: bool = False) -> None:
        if k > 0:
            (self.shared if shared else self.alone).draft_step.observe(batch, ms / k)

    def observe_verify(self, batch: int, k: int, ms: float, shared: bool = False) -> None:
        """A verify of `batch` sequences carrying at most k drafts each."""
        (self.shared if shared else self.alone).verify.observe(batch, k, ms)

    def draft_step(self, batch: float, shared: bool = False) -> float:
        return self.costs(shared).draft_step(batch)

    def verify(self, batch: float, k: int, shared: bool = False) -> float:
        return self.costs(shared).verify(batch, k)

    def observe_acceptance(self, drafted: int, accepted: int, decay: float = 0.99) -> None:
        self.drafted = decay * self.drafted + drafted
        self.accepted = decay * self.accepted + accepted

    def observe_round(self, drafted: int, accepted: int, decay: float = 0.998) -> None:
        """One sequence's round: `drafted` proposals, the first `accepted` of them kept."""
        self.rounds += drafted > 0
        self.draft_prefill_ms *= decay
        self.draft_prefill_rounds = decay * self.draft_prefill_rounds + 1
        for i in range(1, MAX_POSITIONS + 1):
            self.reached[i] *= decay
            self.survived[i] *= decay
        for i in range(1, min(drafted, MAX_POSITIONS) + 1):
            self.reached[i] += 1
            self.survived[i] += i <= accepted

    def observe_draft_prefill(self, ms: float) -> None:
        self.draft_prefill_ms += ms

    @property
    def draft_prefill_per_round(self) -> float:
        """ms of draft prefill each sequence round carries (new prompts cached on the draft), spread over
        MIN_ROUNDS_TO_REPLAN rounds more than have run: a prompt's prefill is paid once for all of its request's
        rounds (64 tokens at τ ≈ 3.7 are 17 rounds, four requests 68), so charged to the first few rounds alone
        it makes speculating look several times its cost (spread over 16, auto dropped to target-only at C = 4,
        where sd was 1.14x ar)."""
        return self.draft_prefill_ms / (self.draft_prefill_rounds + MIN_ROUNDS_TO_REPLAN)

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


def tokens_per_round(alpha: float, k: int) -> float:
    """The i.i.d. model: each draft accepted with probability α independently."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass(frozen=True)
class Plan:
    lanes: int  # 1 (SD) or 2 (PSD)
    k: int
    tokens_per_s: float  # predicted, for all N sequences


def predicted_rate(model: StageModel, sequences: int, lanes: int, k: int) -> float:
    """Tokens per second for all `sequences` in this layout with k drafts a round (k = 0: target-only)."""
    sync = model.draft_prefill_per_round if k > 0 else 0.0  # a target-only round caches nothing on the draft
    if sequences >= 2 and lanes == 2:
        half = sequences / 2
        cycle_ms = 2 * max(k * model.draft_step(half, shared=True) + half * sync, model.verify(half, k, shared=True))
    else:  # a lone sequence runs as in one lane, whatever the layout
        cycle_ms = k * model.draft_step(sequences) + sequences * sync + model.verify(sequences, k)
    per_sequence = model.tokens_per_round(k) if k > 0 else 1.0
    return sequences * per_sequence / cycle_ms * 1e3


def best_plan(model: StageModel, sequences: int, k_max: int, layouts: tuple[int, ...] = (1, 2),
              ks: range | None = None) -> Plan:
    """The layout (among `layouts`) and k (among `ks`, default 0..k_max) with the highest predicted
    throughput at this many sequences."""
    if sequences <= 0 or not model.known:
        return Plan(lanes=2 if 2 in layouts and sequences >= 2 else 1, k=k_max, tokens_per_s=0.0)
    best = Plan(layouts[0], 0, 0.0)
    for k in ks if ks is not None else range(k_max + 1):
        for lanes in layouts:
            rate = predicted_rate(model, sequences, lanes, k)
            if rate > best.tokens_per_s:
                best = Plan(lanes, k, rate)
    return best


def next_plan(model: StageModel, current: Plan, sequences: int, k_max: int, switch_gain: float = 1.05,
              k_gain: float = 1.03, resume_k: int = 0) -> Plan:
    """best_plan with hysteresis: the layout changes only for a clear predicted gain (never for one sequence
    or none: a lone sequence in two lanes already runs exactly as in one), and k only for a smaller one,
    one step at a time.

    Near its best the rate is flat in k, so chasing each estimate's wobble would only trade measured
    acceptance at one length for extrapolated acceptance at another; and a step to k ± 1 is measured (its
    verify cost at this batch, its acceptance) before the next, where a jump would trust extrapolation
    (at C = 32 one went from k = 4 to 7 on a verify cost extrapolated from small batches, and lost 7 %).

    Until acceptance has been measured on this traffic the plan keeps the operator's k (only the layout may
    move, which the stage costs alone decide):
    the prior knows nothing of how bursty acceptance is, and valued geometrically it would cut k at once.
    (After only 16 rounds, two batches' worth at C = 16, the survival estimate was noisy enough to flip
    k 4 → 2 → 4 within two seconds.) Even so the prediction only proposes a k step: the scheduler runs it
    as a trial and keeps it on a measured gain (k_trial.py).

    Two moves are too far for k steps and are judged like a layout switch: to target-only decoding (k = 0,
    one lane) when drafting no longer pays — with a cheap batched decode and a costly draft, plain decoding
    wins at high load — and from it back to speculating at `resume_k`; jump_gain says by how much, before
    acceptance is measured too (at C = 16 here, 16 rounds at the start plan cost auto a fifth of ar's rate)."""
    if sequences <= 0 or not model.known:
        return current
    kept = Plan(current.lanes, current.k, predicted_rate(model, sequences, current.lanes, current.k))
    measured = model.rounds >= MIN_ROUNDS_TO_REPLAN
    # k steps stay among k ≥ 1: k = 0 is entered and left only through the jump below, with its own gains.
    steps = range(max(1, current.k - 1), min(k_max, current.k + 1) + 1) if measured and current.k \
        else range(current.k, current.k + 1)
    far = 0 if current.k else resume_k  # target-only, or back to speculating
    if far != current.k:
        jump = best_plan(model, sequences, k_max, layouts=(1,) if far == 0 else (1, 2), ks=range(far, far + 1))
        nearby = best_plan(model, sequences, k_max, ks=steps)
        if jump.tokens_per_s >= jump_gain(model, far, switch_gain) * max(kept.tokens_per_s, nearby.tokens_per_s):
            return jump
    if not measured:  # acceptance not yet measured: only the layout, at the start k, may move
        best = best_plan(model, sequences, k_max, ks=steps)
        moves = sequences >= 2 and best.lanes != current.lanes and best.tokens_per_s >= switch_gain * kept.tokens_per_s
        return best if moves else current
    if sequences >= 2:
        best = best_plan(model, sequences, k_max, ks=steps)
        if best.lanes != current.lanes and best.tokens_per_s >= switch_gain * kept.tokens_per_s:
            return best
    same_layout = best_plan(model, sequences, k_max, layouts=(current.lanes,), ks=steps)
    return same_layout if same_layout.tokens_per_s >= k_gain * kept.tokens_per_s else kept


def jump_gain(model: StageModel, to_k: int, switch_gain: float) -> float:
    """The predicted gain that moves the plan to target-only decoding (to_k = 0) or back to speculating.

    Measured: a switch's gain to drop; more to resume, since resuming first re-sends every sequence's tokens
    to the draft, a cost the rate leaves out. Before acceptance is measured the rates rest on the prior
    (α = 0.7, geometric), which undervalues bursty acceptance: dropping then asks a clear margin (at high load
    plain decoding wins by far more, and every round spent finding that out costs), and resuming asks none
    (the draft came back before acceptance was known: speculate to measure it, unless predicted to lose)."""
    if model.rounds >= MIN_ROUNDS_TO_JUMP:
        return switch_gain if to_k == 0 else RESUME_GAIN
    return PRIOR_DROP_GAIN if to_k == 0 else 1.0


def rebalance(sizes: list[int]) -> int:
    """How many sequences the larger of two lanes should hand the smaller (never leaves one idle)."""
    if len(sizes) != 2:
        return 0
    return max(0, (max(sizes) - min(sizes)) // 2)
