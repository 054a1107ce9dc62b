"""What a round reports: judge pass rates with 90% Wilson intervals, the KL to the
reference and the reward margins; one metrics.jsonl row per round and a PNG plot.

The row (kind "round", step = the last optimizer step of the round, round 0 = the
initial policy before any training):
  judge/pass_rate, _low, _high, judge/n    held-out samples of the current policy that
                                           pass (score > online.threshold), 90% interval,
                                           over the samples the judge scored
  judge/unscored, judge/train_unscored     samples the judge gave no score (None, NaN):
                                           left out of the pass rates and the training
  judge/train_pass_rate, _low, _high       the same for the samples the round trained on
  kl_ref                                   mean over held-out samples y ~ pi of
                                           log pi(y|x) - log pi_ref(y|x): the signed Monte
                                           Carlo estimate of KL(pi || pi_ref) per sequence
                                           (negative on few samples; not clamped, unlike
                                           the loss's z0, which heldout/kl is)
  heldout/rewards_margins, heldout/loss,   the loss's eval metrics on the held-out examples
  heldout/kl                               (labelled as training examples are)
  examples/desirable, examples/undesirable, examples/pairs   what the round trained on
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from kto_jax.eval.stats import rate
from kto_jax.online.labels import passes


def finite_scores(scores: Sequence[Any]) -> list[float]:
    """The scores that are verdicts (finite numbers); None and NaN are no verdict."""
    return [float(s) for s in scores if isinstance(s, (int, float)) and not isinstance(s, bool)
            and math.isfinite(float(s))]


# What kl_ref is, where it is shown (plot, console): an estimate, signed, never clamped.
KL_REF_TITLE = "held-out mean log pi/pi_ref per sequence\n(signed estimate of KL(pi || pi_ref))"
KL_REF_LABEL = "mean log pi/pi_ref on held-out samples (signed KL estimate)"


def pass_rate_fields(prefix: str, scores: Sequence[float], threshold: float) -> dict[str, Any]:
    """{prefix, prefix_low, prefix_high} of the share of scores that pass (90% Wilson);
    scores that are no verdict are left out."""
    scores = finite_scores(scores)
    r = rate(sum(passes(s, threshold) for s in scores), len(scores))
    return {prefix: r.rate, f"{prefix}_low": r.low, f"{prefix}_high": r.high}


def round_record(round_index: int, *, heldout_scores: Sequence[float] | None, threshold: float,
                 train_scores: Sequence[float] | None, train_labels: Sequence[bool | None] | None,
                 num_pairs: int | None, eval_metrics: dict | None, kl_ref: float | None
                 ) -> dict[str, Any]:
    """The metrics.jsonl row of one round (see the module docstring); without held-out
    scores (a round online.heldout_every skips) the held-out fields are absent."""
    row: dict[str, Any] = {"round": round_index, "kind": "round"}
    if heldout_scores is not None:
        row.update(pass_rate_fields("judge/pass_rate", heldout_scores, threshold))
        row["judge/n"] = len(finite_scores(heldout_scores))
        row["judge/unscored"] = len(heldout_scores) - row["judge/n"]
    if train_scores is not None:
        row.update(pass_rate_fields("judge/train_pass_rate", train_scores, threshold))
        row["judge/train_unscored"] = len(train_scores) - len(finite_scores(train_scores))
    row["kl_ref"] = kl_ref
    ev = eval_metrics or {}
    row["heldout/rewards_margins"] = ev.get("rewards/margins")
    row["heldout/loss"] = ev.get("loss")
    row["heldout/kl"] = ev.get("kl")
    if train_labels is not None:
        row["examples/desirable"] = sum(1 for x in train_labels if x is True)
        row["examples/undesirable"] = sum(1 for x in train_labels if x is False)
    if num_pairs is not None:
        row["examples/pairs"] = num_pairs
    return row


def write_plot(rows: Sequence[dict], out_path: str, title: str) -> str | None:
    """Pass rate (with its interval), KL to the reference and the held-out reward margin
    per round, as a PNG; None when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rounds = [r for r in rows if r.get("kind") == "round"]
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("judge/pass_rate", "held-out"), ("judge/train_pass_rate", "train samples")):
        pts = [(r["round"], r[key], max(0.0, r[key] - r[f"{key}_low"]), max(0.0, r[f"{key}_high"] - r[key]))
               for r in rounds if r.get(key) is not None]
        if pts:
            rx, ry, lo, hi = zip(*pts)
            axes[0].errorbar(rx, ry, yerr=[lo, hi], marker="o", capsize=3, label=label)
    axes[0].set_title("judge pass rate (90% Wilson interval)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    for ax, key, title_ in ((axes[1], "kl_ref", KL_REF_TITLE),
                            (axes[2], "heldout/rewards_margins", "held-out reward margin")):
        pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
        ax.set_title(title_)
    for ax in axes:
        ax.set_xlabel("round")
        if x:
            ax.set_xticks(x)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
