"""The pass-rate-vs-KL frontier of a sweep: curves, the summary at matched KL, the plot.

A sweep (kto_jax/demo/frontier.py) measures points: (method, seed, knob) -> the KL of the
policy to pi_ref and its held-out pass rate. A spender of KL is not better at equal KL,
so methods are compared at the same KL:

  curve         one method's points of one seed, sorted by KL (points at equal KL are
                averaged): the pass rate as a piecewise-linear function of KL. No
                monotone envelope: a curve that goes down is kept as measured.
  KL range      of a method: the KL values every one of its seeds' curves spans,
                [max over seeds of the lowest KL, min over seeds of the highest].
                Interpolation never leaves it: nothing is extrapolated.
  common range  the baseline method's (KTO's) range, narrowed by each other method's in
                table order; a method whose range does not overlap what is left is
                reported as not reachable, and the others are compared without it.
  matched KL    `GRID_POINTS` evenly spaced KL values over the common range. At each:
                every seed's interpolated pass rate, their mean over seeds, and a 90%
                t-interval across seeds, mean +- t(S-1) sd / sqrt(S); with one seed,
                the Wilson interval of the interpolated count (rate x n of n).
  vs baseline   per seed, method minus baseline at the same KL. The seeds of one sweep
                share each method's feedback data, data order and held-out sampling
                seed, so the difference is paired: its mean with a 90% paired
                t-interval over the seeds both have; "separated" when it excludes 0.

Why across seeds and not a Wilson interval of the pooled counts: seeds differ in their
feedback samples, data order and held-out samples, and a run on a few hundred labels
moves differently from seed to seed; a pooled binomial interval counts only the held-out
sampling noise and would be too narrow. The spread across seeds holds both. With three
seeds t(2) = 2.92 at 90%, so the intervals are wide; that is the honest width.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import numpy as np

from kto_jax.eval import stats

GRID_POINTS = 5
BASELINE = "KTO"


@dataclasses.dataclass(frozen=True)
class Curve:
    """One method's points of one seed: pass rate [P] against KL [P], KL ascending."""
    kl: np.ndarray
    rate: np.ndarray
    n: int  # held-out samples behind each pass rate

    def at(self, x: float) -> float:
        """The pass rate at KL `x` by linear interpolation; `x` must lie in [kl[0], kl[-1]]."""
        if not self.kl[0] - 1e-12 <= x <= self.kl[-1] + 1e-12:
            raise ValueError(f"KL {x} lies outside this curve's range [{self.kl[0]}, {self.kl[-1]}]")
        return float(np.interp(x, self.kl, self.rate))


def make_curve(points: list[dict]) -> Curve:
    """The Curve through `points` (dicts with 'kl' and 'pass_rate' {'rate', 'n'})."""
    kl = np.array([p["kl"] for p in points], dtype=np.float64)
    rate = np.array([p["pass_rate"]["rate"] for p in points], dtype=np.float64)
    unique, index = np.unique(kl, return_inverse=True)  # sorted; equal KL averaged
    mean = np.bincount(index, weights=rate) / np.bincount(index)
    return Curve(unique, mean, min(int(p["pass_rate"]["n"]) for p in points))


def curves(points: list[dict]) -> dict[str, dict[int, Curve]]:
    """method -> seed -> Curve, over every knob (step, beta) of that method and seed."""
    groups: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        groups[p["method"]][int(p["seed"])].append(p)
    return {m: {s: make_curve(ps) for s, ps in sorted(by_seed.items())} for m, by_seed in groups.items()}


def kl_range(seed_curves: dict[int, Curve]) -> tuple[float, float] | None:
    """[max over seeds of min KL, min over seeds of max KL]; None when the seeds do not overlap."""
    lo = max(float(c.kl[0]) for c in seed_curves.values())
    hi = min(float(c.kl[-1]) for c in seed_curves.values())
    return (lo, hi) if lo <= hi else None


def common_range(ranges: dict[str, tuple[float, float] | None], order: list[str]
                 ) -> tuple[tuple[float, float] | None, list[str]]:
    """(the common KL range, the methods that reach it), narrowing from order[0] on.

    A method is left out when its own range is None or does not overlap the range of
    the methods kept before it."""
    common, kept = None, []
    for name in order:
        r = ranges.get(name)
        if r is None:
            continue
        if common is None:
            common, kept = r, [name]
        elif max(common[0], r[0]) <= min(common[1], r[1]):
            common, kept = (max(common[0], r[0]), min(common[1], r[1])), [*kept, name]
    return common, kept


def t_interval(values: list[float], confidence: float = stats.DEFAULT_CONFIDENCE
               ) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t(S-1) sd / sqrt(S), the two-sided `confidence` interval."""
    from scipy.stats import t as student_t
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError("a t-interval needs at least 2 values")
    half = student_t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def rate_interval(per_seed: list[float], n: int, confidence: float) -> tuple[float, float, float]:
    """Mean pass rate over seeds with its interval (t across seeds; Wilson for one seed)."""
    if len(per_seed) == 1:
        low, high = stats.wilson_interval(per_seed[0] * n, n, confidence)
        return per_seed[0], low, high
    mean, low, high = t_interval(per_seed, confidence)
    return mean, max(0.0, low), min(1.0, high)


def matched_kl(points: list[dict], order: list[str] | None = None, baseline: str = BASELINE,
               grid_points: int = GRID_POINTS, confidence: float = stats.DEFAULT_CONFIDENCE) -> dict:
    """The summary at matched KL of a sweep's points; see the module docstring.

    `order`: the methods in table order (default: as first seen); the baseline goes first
    when present, else the first method is the baseline."""
    by_method = curves(points)
    order = [m for m in (order or list(dict.fromkeys(p["method"] for p in points))) if m in by_method]
    if baseline not in order:
        baseline = order[0] if order else baseline
    order = [baseline, *[m for m in order if m != baseline]] if order else []
    ranges = {m: kl_range(by_method[m]) for m in order}
    common, kept = common_range(ranges, order)
    grid = [] if common is None else list(np.linspace(common[0], common[1], grid_points)
                                          if common[1] > common[0] else [common[0]])
    summary = {"baseline": baseline, "confidence": confidence, "common_range": common,
               "grid": [float(x) for x in grid],
               "interval": "t across seeds (Wilson of the interpolated count for one seed); "
                           "vs baseline: paired t across the seeds both have", "methods": {}}
    for m in order:
        row: dict[str, Any] = {"kl_range": ranges[m], "seeds": sorted(by_method[m]), "reachable": m in kept}
        if m in kept:
            row["at"] = [_at(by_method, m, baseline, x, confidence) for x in grid]
        summary["methods"][m] = row
    return summary


def _at(by_method: dict[str, dict[int, Curve]], method: str, baseline: str, x: float,
        confidence: float) -> dict:
    """One method at KL x: per-seed rates, mean and interval, and the paired difference."""
    seeds = by_method[method]
    per_seed = {s: c.at(x) for s, c in seeds.items()}
    n = min(c.n for c in seeds.values())
    mean, low, high = rate_interval(list(per_seed.values()), n, confidence)
    out = {"kl": float(x), "rate": mean, "low": low, "high": high, "per_seed": per_seed, "vs_baseline": None}
    if method != baseline:
        shared = sorted(set(seeds) & set(by_method[baseline]))
        diffs = [per_seed[s] - by_method[baseline][s].at(x) for s in shared]
        if len(diffs) >= 2:
            d, d_low, d_high = t_interval(diffs, confidence)
            out["vs_baseline"] = {"diff": d, "low": d_low, "high": d_high, "seeds": len(diffs),
                                  "separated": d_low > 0 or d_high < 0}
        elif diffs:
            out["vs_baseline"] = {"diff": diffs[0], "low": None, "high": None, "seeds": 1, "separated": None}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def summary_table(summary: dict) -> str:
    """The matched-KL summary as markdown: pass rates, differences vs the baseline, verdicts."""
    grid, baseline = summary["grid"], summary["baseline"]
    if not summary["methods"]:
        return "No frontier points yet."
    pct = round(100 * summary["confidence"])
    head = "| method | KL range of its seeds | " + " | ".join(f"KL {x:.2f}" for x in grid) + " |"
    lines = [f"Pass rate at matched KL (mean over seeds, {pct}% interval: {summary['interval']}):", "",
             head, "|" + " --- |" * (2 + len(grid))]
    separated, not_separated = [], []
    for name, row in summary["methods"].items():
        r = row["kl_range"]
        span = "seeds do not overlap" if r is None else f"{r[0]:.2f}-{r[1]:.2f}"
        if not row["reachable"]:
            lines.append(f"| {name} | {span} | " + " | ".join(["not reachable"] * len(grid)) + " |")
            continue
        cells = []
        for at in row["at"]:
            cell = f"{_pct(at['rate'])}% [{_pct(at['low'])}, {_pct(at['high'])}]"
            vs = at["vs_baseline"]
            if vs is not None and vs["low"] is not None:
                cell += f"; Δ {100 * vs['diff']:+.1f} [{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}]"
                (separated if vs["separated"] else not_separated).append(f"{name} at KL {at['kl']:.2f}")
            cells.append(cell)
        lines.append(f"| {name} (seeds {', '.join(map(str, row['seeds']))}) | {span} | " + " | ".join(cells) + " |")
    lines.append("")
    if summary["common_range"] is None:
        lines.append("No KL value is reached by every method: nothing to compare at matched KL.")
    else:
        lo, hi = summary["common_range"]
        lines.append(f"Common KL range {lo:.2f}-{hi:.2f} nats; Δ = method minus {baseline} in points "
                     f"of pass rate, paired by seed.")
        unreachable = [m for m, row in summary["methods"].items() if not row["reachable"]]
        if unreachable:
            lines.append("Not reachable (KL range outside the common range, not extrapolated): "
                         + "; ".join(unreachable) + ".")
        lines.append(f"Separated from {baseline} (interval excludes 0): " + ("; ".join(separated) or "none") + ".")
        lines.append(f"Not separated from {baseline}: " + ("; ".join(not_separated) or "none") + ".")
    return "\n".join(lines)


def seed_mean_curve(points: list[dict]) -> tuple[list[float], list[float]]:
    """(KL, pass rate) of one method's knobs averaged over seeds, sorted by KL.

    Only the knobs every one of the method's seeds holds: a mean over a changing set of
    seeds along one curve would mix seed effects into the trend (an unfinished sweep's
    later checkpoints stay as its seeds' own points)."""
    seeds = {p["seed"] for p in points}
    knobs: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        knobs[(p.get("beta"), p["step"])].append(p)
    means = sorted((float(np.mean([p["kl"] for p in ps])), float(np.mean([p["pass_rate"]["rate"] for p in ps])))
                   for ps in knobs.values() if {p["seed"] for p in ps} == seeds)
    return [m[0] for m in means], [m[1] for m in means]


def write_plot(results: dict, path: str, title: str) -> str | None:
    """Pass rate against KL, one colour per method: the seed-mean curve, each seed's points,
    the reference at (0, its mean base rate), the common KL range shaded and the matched-KL
    summary's means with their intervals. None when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = results["points"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = list(dict.fromkeys(p["method"] for p in points))
    for i, m in enumerate(methods):
        mine = [p for p in points if p["method"] == m]
        color = f"C{i % 10}"
        ax.scatter([p["kl"] for p in mine], [100 * p["pass_rate"]["rate"] for p in mine], color=color,
                   alpha=0.35, s=18)
        kl, rate = seed_mean_curve(mine)
        seeds = len({p["seed"] for p in mine})
        ax.plot(kl, [100 * r for r in rate], "-o", color=color, markersize=4,
                label=f"{m} (mean of {seeds} seed{'s' if seeds != 1 else ''})")
    refs = [r["pass_rate"]["rate"] for r in results.get("references", {}).values()]
    if refs:
        ax.plot([0.0], [100 * float(np.mean(refs))], "k*", markersize=13,
                label=f"reference π_ref (KL 0, mean of {len(refs)} seed{'s' if len(refs) != 1 else ''})")
    summary = results.get("summary") or {}
    common = summary.get("common_range")
    if common:
        ax.axvspan(common[0], common[1], color="0.85", alpha=0.5, zorder=0, label="KL range all methods reach")
        width = (common[1] - common[0]) or 1.0
        for i, m in enumerate(methods):  # the matched-KL table's cells, side by side at each KL
            cells = summary["methods"].get(m, {}).get("at") or []
            shift = 0.04 * width * (i - (len(methods) - 1) / 2)
            ax.errorbar([c["kl"] + shift for c in cells], [100 * c["rate"] for c in cells],
                        yerr=[[100 * (c["rate"] - c["low"]) for c in cells],
                              [100 * (c["high"] - c["rate"]) for c in cells]],
                        fmt="D", markersize=3, color=f"C{i % 10}", capsize=3, alpha=0.8,
                        label="matched KL: mean, 90% interval" if i == 0 else None)
    ax.set_xlabel("KL(π_θ ‖ π_ref), nats (Monte-Carlo over the held-out samples)")
    ax.set_ylabel("held-out pass rate, % (rule judge)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
