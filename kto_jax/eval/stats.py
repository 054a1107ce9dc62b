"""Binomial confidence intervals for pass rates and winrates.

The paper reports winrates with 90% binomial confidence intervals (Fig. 3, Table 3).
We use the Wilson score interval: unlike the normal ("Wald") interval it stays
inside [0, 1] and keeps close to its nominal coverage for small n and for rates
near 0 or 1, which is where a demo's 30-60 judged prompts live. A tie counts as
half a win, so a winrate is (wins + ties / 2) / n; the interval is then computed
from that rate as if it were a binomial proportion over n trials.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

DEFAULT_CONFIDENCE = 0.90


@dataclasses.dataclass(frozen=True)
class Rate:
    """A proportion with its Wilson interval: `rate` in [low, high] at `confidence`."""
    successes: float
    n: int
    rate: float
    low: float
    high: float
    confidence: float = DEFAULT_CONFIDENCE

    def __str__(self) -> str:
        pct = round(self.confidence * 100)
        return (f"{100 * self.rate:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] "
                f"({pct}% CI, n={self.n})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def wilson_interval(successes: float, n: int, confidence: float = DEFAULT_CONFIDENCE
                    ) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n.

    With p = successes / n and z the two-sided normal quantile of `confidence`:
      center = (p + z^2 / 2n) / (1 + z^2 / n)
      half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    Returns (0, 1) when n == 0.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def rate(successes: float, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Rate:
    """successes / n with its Wilson interval (rate 0 when n == 0)."""
    low, high = wilson_interval(successes, n, confidence)
    return Rate(float(successes), int(n), successes / n if n else 0.0, low, high, confidence)


def winrate(outcomes: list[float], confidence: float = DEFAULT_CONFIDENCE) -> Rate:
    """Winrate of outcomes in {1 (win), 0.5 (tie), 0 (loss)} with its Wilson interval."""
    bad = [o for o in outcomes if o not in (0, 0.5, 1)]
    if bad:
        raise ValueError(f"judge outcomes must be 1, 0.5 or 0; got {bad[:3]}")
    return rate(float(sum(outcomes)), len(outcomes), confidence)
