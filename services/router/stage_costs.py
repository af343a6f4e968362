"""Stage costs fitted to measured calls — a draft step t_d(B), a verify t_v(B, k) — and the host's pace.

A VM's speed moves (on the Zen 5 EPYC by 20–45 % within the hour), but the plan measures only the layout it runs:
the costs of the others (target-only while speculating, the other lane count) are what start-up calibration
measured. Compared as they were, the plan dropped to target-only on a step calibrated at 46.5 ms that measured 57,
and at C = 2 took two lanes on calibrated costs and left them on their first measured ones. So a cost not yet
measured live is read at the host's pace (`Pace`): scaled by how much slower the live calls run than calibration
measured the same costs. A cost measured live is read as fitted: when the layouts' costs move apart for reasons
of their own (two lanes' contention on real traffic), a pace shared by all would carry one layout's move to the
other and lose it when the plan came back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# How fast the pace follows live calls: a call weighs 1/50, so that calls 15 % apart move it ~2 %, and a host's
# move (over minutes) is taken within ~25 rounds (seconds).
PACE_DECAY = 0.98
PRIOR_CALLS = 4.0  # calls' worth of "no move" the pace starts from, so the first call is not taken whole


@dataclass
class Pace:
    """How much slower live calls run than start-up calibration measured their costs: a decayed mean of the ratio,
    each call's time over its cost's calibrated time at its batch. It also holds real traffic's longer contexts,
    which cost the stages not measured live as much."""

    factor: float = 1.0  # below 1: faster than at start-up
    _weight: float = PRIOR_CALLS

    @property
    def level(self) -> float:
        return math.log(self.factor)

    def observe(self, ratio: float) -> None:
        self._weight = PACE_DECAY * self._weight + 1
        self.factor += (ratio - self.factor) / self._weight


@dataclass
class LinearCost:
    """t(B) ≈ a + b·B fitted by exponentially weighted least squares over recent observations; until a live call
    is measured (`paced`), read at the host's pace (`Pace`; None: as fitted)."""

    decay: float = 0.95
    _sw: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0
    live: bool = False  # a live call was measured: read as fitted
    _calibrated: LinearCost | None = None  # the fit of calibration's calls alone, what live calls are paced by

    def observe(self, batch: float, ms: float, pace: Pace | None = None, paced: bool = True) -> None:
        """One call of `batch` took `ms`. `paced`: a live call, which measures the host's pace (False: start-up
        calibration, the reference it is measured against)."""
        if paced and not self.live:  # calibration's calls, taken to the host's pace before live ones join them
            if self.known:
                self._calibrated = replace(self)
                self._scale(pace.factor if pace is not None else 1.0)
            self.live = True
        if paced and pace is not None and self._calibrated is not None:
            pace.observe(ms / self._calibrated(batch))
        d = self.decay
        self._sw = d * self._sw + 1
        self._sx = d * self._sx + batch
        self._sy = d * self._sy + ms
        self._sxx = d * self._sxx + batch * batch
        self._sxy = d * self._sxy + batch * ms

    @property
    def known(self) -> bool:
        return self._sw > 0

    def __call__(self, batch: float, pace: Pace | None = None) -> float:
        if not self.known:
            return 0.0
        mean_x, mean_y = self._sx / self._sw, self._sy / self._sw
        var = self._sxx / self._sw - mean_x * mean_x
        slope = max(0.0, (self._sxy / self._sw - mean_x * mean_y) / var) if var > 1e-9 else 0.0
        fitted = max(1e-3, mean_y + slope * (batch - mean_x))
        return fitted if self.live or pace is None else fitted * pace.factor

    def _scale(self, factor: float) -> None:
        """Every observed time times `factor` (the fit's mean and slope are linear in them)."""
        self._sy *= factor
        self._sxy *= factor


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
