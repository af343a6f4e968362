"""Stage costs fitted to measured calls — a draft step t_d(B), a verify t_v(B, k) — and the host's pace.

A VM's speed moves (on the Zen 5 EPYC by 20–45 % within the hour), but the plan measures only the layout it runs:
the costs of the others (target-only while speculating, the other lane count) are what start-up calibration
measured. Compared as they were, the plan dropped to target-only on a step calibrated at 46.5 ms that measured 57,
and at C = 2 took two lanes on calibrated costs and left them on their first measured ones. So calibration's
calls are read at the host's pace (`Pace`): scaled by how much slower live calls run than calibration measured
the same costs. Live calls are read as measured, and as they accumulate calibration's share of a cost fades (it
decays with each, as any older call does): when the layouts' costs move apart for reasons of their own (two
lanes' contention on real traffic), a pace applied to live calls too would carry one layout's move to the other
and lose it when the plan came back. A cost measured live once and then left keeps its last live calls as they
were: only calibration's share follows the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# How fast the pace follows live calls: a call weighs 1/50, so that calls ±15 % apart leave it within ~2 %, and a
# host's move (over minutes) is two-thirds taken within ~25 rounds (seconds).
PACE_DECAY = 0.98
PRIOR_CALLS = 4.0  # calls' worth of "no move" the pace starts from, so the first call is not taken whole
# A live call's time over calibration's fit, kept within these: where a fit is far off at a batch (a convex
# calibration fitted by a line), one call must not move every calibrated cost by a multiple.
RATIO_BOUNDS = (0.5, 2.0)


@dataclass
class Pace:
    """How much slower live calls run than start-up calibration measured their costs: a decayed mean of the ratio,
    each call's time over its cost's calibration fit at its batch. It also holds real traffic's longer contexts,
    which cost the stages not measured live as much."""

    factor: float = 1.0  # below 1: faster than at start-up
    _weight: float = PRIOR_CALLS

    @property
    def level(self) -> float:
        return math.log(self.factor)

    def observe(self, ratio: float) -> None:
        self._weight = PACE_DECAY * self._weight + 1
        self.factor += (min(max(ratio, RATIO_BOUNDS[0]), RATIO_BOUNDS[1]) - self.factor) / self._weight


@dataclass
class Sums:
    """Weighted least-squares sums of calls (batch x, time y), each weighed down by later calls."""

    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def decay(self, d: float) -> None:
        self.w, self.x, self.y, self.xx, self.xy = d * self.w, d * self.x, d * self.y, d * self.xx, d * self.xy

    def add(self, batch: float, ms: float) -> None:
        self.w, self.x, self.y = self.w + 1, self.x + batch, self.y + ms
        self.xx, self.xy = self.xx + batch * batch, self.xy + batch * ms

    def fit(self, batch: float, y_scale: float = 1.0, other: Sums | None = None) -> float:
        """The line through these calls, their times times `y_scale`, and `other`'s calls, at `batch`."""
        o = other or Sums()
        w, x, y = self.w + o.w, self.x + o.x, y_scale * self.y + o.y
        xx, xy = self.xx + o.xx, y_scale * self.xy + o.xy
        mean_x, mean_y = x / w, y / w
        var = xx / w - mean_x * mean_x
        slope = max(0.0, (xy / w - mean_x * mean_y) / var) if var > 1e-9 else 0.0
        return max(1e-3, mean_y + slope * (batch - mean_x))


@dataclass
class LinearCost:
    """t(B) ≈ a + b·B fitted by exponentially weighted least squares over recent calls: calibration's read at the
    host's pace (`Pace`; None: as measured), live calls as measured."""

    decay: float = 0.95
    _calibration: Sums = field(default_factory=Sums)
    _live: Sums = field(default_factory=Sums)

    def observe(self, batch: float, ms: float, pace: Pace | None = None, paced: bool = True) -> None:
        """One call of `batch` took `ms`. `paced`: a live call, which also measures the host's pace against
        calibration's fit (False: a start-up calibration call)."""
        if paced and pace is not None and self._calibration.w > 0:
            pace.observe(ms / self._calibration.fit(batch))
        self._calibration.decay(self.decay)
        self._live.decay(self.decay)
        (self._live if paced else self._calibration).add(batch, ms)

    @property
    def known(self) -> bool:
        return self._calibration.w + self._live.w > 0

    @property
    def live(self) -> bool:
        """A live call was measured."""
        return self._live.w > 0

    def __call__(self, batch: float, pace: Pace | None = None) -> float:
        if not self.known:
            return 0.0
        return self._calibration.fit(batch, pace.factor if pace is not None else 1.0, self._live)


@dataclass
class VerifyCost:
    """t_v(B, k): one LinearCost in the batch for each draft length measured, linear in k between them.

    Verifying k drafts feeds k + 1 tokens per sequence, so the cost grows with k, but not in proportion
    (a CPU verify of 5 tokens costs 1.3x one token at batch 1, 1.7x at batch 8): measured, not modelled."""

    by_k: dict[int, LinearCost] = field(default_factory=dict)

    def observe(self, batch: float, k: int, ms: float, pace: Pace | None = None, paced: bool = True) -> None:
        self.by_k.setdefault(k, LinearCost()).observe(batch, ms, pace, paced)

    @property
    def known(self) -> bool:
        return bool(self.by_k)

    def __call__(self, batch: float, k: float, pace: Pace | None = None) -> float:
        if not self.by_k:
            return 0.0
        ks = sorted(self.by_k)
        if k in self.by_k or len(ks) == 1:
            return self.by_k[k if k in self.by_k else ks[0]](batch, pace)
        below, above = [x for x in ks if x < k], [x for x in ks if x > k]
        # Interpolate between the nearest measured lengths; past the ends, continue the nearest two's slope.
        lo, hi = (below[-1], above[0]) if below and above else (ks[-2], ks[-1]) if below else (ks[0], ks[1])
        t_lo, t_hi = self.by_k[lo](batch, pace), self.by_k[hi](batch, pace)
        return max(1e-3, t_lo + (t_hi - t_lo) * (k - lo) / (hi - lo))


@dataclass
class StageCosts:
    """One draft step t_d(B) and one verify t_v(B, k), as measured under one sharing of the host's cores."""

    draft_step: LinearCost = field(default_factory=LinearCost)
    verify: VerifyCost = field(default_factory=VerifyCost)

    @property
    def known(self) -> bool:
        return self.draft_step.known and self.verify.known
