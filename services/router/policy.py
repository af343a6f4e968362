"""Choosing one lane or two, and k, from measured stage times.

At N sequences, one lane (SD) costs  s(k, N)·t_d(N) + N·t_p + t_v(N, k)  per cycle; two lanes (PSD) cost
2·max(s(k, N/2)·t_d(N/2) + N/2·t_p, t_v(N/2, k)), where s is the draft steps a round of k runs (k, or fewer
when drafting stops early: StageModel.draft_steps), t_p is the draft's prefill of new prompts per sequence round
(what speculating costs beyond drafting) — on a host whose cores the two services share, with the stage costs
measured at half the cores (each stage then runs beside the other). Both cycles produce N·E[tokens per
round] (measured per draft position, see StageModel.tokens_per_round). The policy picks the layout and k
with the most tokens per second. It only decides *how* tokens are computed, never which: output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.router.stage_model import MIN_ROUNDS_TO_JUMP, MIN_ROUNDS_TO_REPLAN, StageModel

RESUME_GAIN = 1.25  # predicted gain that takes target-only decoding back to speculating
# Predicted on the prior (or a few rounds' acceptance) alone, target-only must beat speculating by this to start
# it. Here the prediction said 1.2-1.4x at C = 4, where sd measured 1.14x ar, and 1.6-2x at C = 8, where ar won.
PRIOR_DROP_GAIN = 1.5


def tokens_per_round(alpha: float, k: int) -> float:
    """The i.i.d. model: each draft accepted with probability α independently."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass(frozen=True)
class Plan:
    lanes: int  # 1 (SD) or 2 (PSD)
    k: int
    tokens_per_s: float  # predicted, for all N sequences


def predicted_rate(model: StageModel, sequences: int, lanes: int, k: int) -> float:
    """Tokens per second for all `sequences` in this layout with k drafts a round (k = 0: target-only); those
    beyond what its lanes hold wait their turn (one lane holds half what two do)."""
    served, cycle_ms = _cycle(model, sequences, lanes, k)
    per_sequence = model.tokens_per_round(k) if k > 0 else 1.0
    return served * per_sequence / cycle_ms * 1e3


def sequence_round_ms(model: StageModel, sequences: int, lanes: int, k: int) -> float:
    """Predicted device ms one sequence round costs in this layout (a cycle's cost over the sequences it serves)."""
    served, cycle_ms = _cycle(model, sequences, lanes, k)
    return cycle_ms / max(served, 1)


def _cycle(model: StageModel, sequences: int, lanes: int, k: int) -> tuple[float, float]:
    """The sequences a cycle serves (at most what its lanes hold) and its predicted ms: one round of each lane."""
    sequences = model.served(sequences, lanes)
    sync = model.draft_prefill_per_round(k) if k > 0 else 0.0  # a target-only round caches nothing on the draft
    if sequences >= 2 and lanes == 2:
        half = sequences / 2
        steps = model.draft_steps(k, half)  # also the longest proposal the verify carries
        return sequences, 2 * max(steps * model.draft_step(half, shared=True) + half * sync,
                                  model.verify(half, steps, shared=True))
    # a lone sequence runs as in one lane, whatever the layout
    steps = model.draft_steps(k, sequences)
    return sequences, steps * model.draft_step(sequences) + sequences * sync + model.verify(sequences, steps)


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
