"""Masked reductions and the metric convention shared by every loss.

Every loss returns `metrics` made only of additive quantities: masked sums (keys
ending in `_sum`) and counts (`num_examples`, `loss_denominator`, `count/...`).
Summing two metric dicts key by key gives the metrics of the union of the two
batches, so gradient accumulation (a scan over microbatches) and multi-host
reduction are exact. `summarize_metrics` turns summed metrics into readable means;
a mean over nothing (the undesirable rewards of an all-desirable window, say) is
left out rather than reported as 0, and so is `rewards/margins` unless both
classes are present.

TRL averages a class mean per microbatch and then over the microbatches that hold
the class. `microbatch_means` adds that to one microbatch's metrics as additive
entries too (`microbatch/NAME_sum`, the microbatch's mean, and
`count/microbatch/NAME`, 1 when it has one), so the same sums give either average:
`summarize_metrics(summed, averaging="pooled" | "microbatch")`.
"""

from typing import Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# readable name -> (sum key, count key). Only keys present in the summed dict are used.
_MEANS = {
    "loss": ("loss_sum", "loss_denominator"),
    "kl": ("kl_sum", "num_examples"),
    "kl/unclamped": ("kl/unclamped_sum", "num_examples"),
    "rewards/desirable": ("rewards/desirable_sum", "count/desirable"),
    "rewards/undesirable": ("rewards/undesirable_sum", "count/undesirable"),
    "logps/desirable": ("logps/desirable_sum", "count/desirable"),
    "logps/undesirable": ("logps/undesirable_sum", "count/undesirable"),
    "rewards/accuracies": ("rewards/accuracies_sum", "num_examples"),
    "nll": ("nll_sum", "count/tokens"),
    # a mixture of experts' load-balancing loss (kto_jax/models/moe.py), added by the train step
    "router_aux_loss": ("router_aux_loss_sum", "loss_denominator"),
}
_COUNTS = ("num_examples", "loss_denominator")
# the means TRL logs once per microbatch (KTOTrainer / DPOTrainer `_compute_loss`) and averages
# over the microbatches where they exist; rewards/margins needs both classes.
MICROBATCH_MEAN_NAMES = ("loss", "kl", "rewards/desirable", "rewards/undesirable",
                         "logps/desirable", "logps/undesirable")
MICROBATCH_PREFIX = "microbatch/"
MICROBATCH_COUNT_PREFIX = "count/microbatch/"
AVERAGING = ("pooled", "microbatch")


def as_mask(mask: Optional[Array], like: Array) -> Array:
    """A float32 0/1 mask shaped like `like` ([M]); all ones when `mask` is None."""
    if mask is None:
        return jnp.ones(like.shape, jnp.float32)
    return jnp.asarray(mask).astype(jnp.float32)


def zero_masked(x: Array, mask: Array) -> Array:
    """`x` with masked entries replaced by 0 BEFORE any math, so NaN/inf in padded rows
    cannot leak into values or gradients (a `where` after the math still passes
    0 * NaN = NaN to the gradient)."""
    return jnp.where(mask > 0, x, jnp.zeros_like(x))


def masked_sum(x: Array, mask: Array) -> Array:
    """Sum of `x` where `mask` is 1; masked entries never propagate NaN or inf."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0))


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of `x` over `mask`; 0 when the mask is empty. Safe for NaN in masked entries."""
    return masked_sum(zero_masked(x, mask), mask) / jnp.maximum(jnp.sum(mask), 1.0)


def f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def add_metrics(a: Mapping[str, Array], b: Mapping[str, Array]) -> dict:
    """Key-wise sum of two metric dicts (the accumulation rule; keys must match)."""
    return {k: a[k] + b[k] for k in a}


def microbatch_means(metrics: Mapping[str, Array]) -> dict:
    """`metrics` of ONE microbatch plus its per-microbatch means as additive entries.

    For each name of `MICROBATCH_MEAN_NAMES` the loss reports (and `rewards/margins`
    when it reports both classes' rewards): `microbatch/NAME_sum` = this microbatch's
    mean (0 when it has nothing to average) and `count/microbatch/NAME` = 1.0 when it
    has (0.0 otherwise). Summed over microbatches, steps and hosts and divided, they
    give TRL's average of per-microbatch means (`summarize_metrics(...,
    averaging="microbatch")`). The train step's loss calls (`HaloLoss.__call__`) add them.
    """
    out = dict(metrics)
    means = {}
    for name in MICROBATCH_MEAN_NAMES:
        sum_key, count_key = _MEANS[name]
        if sum_key in metrics and count_key in metrics:
            count = f32(metrics[count_key])
            means[name] = (count > 0, f32(metrics[sum_key]) / jnp.maximum(count, 1.0))
    if "rewards/desirable" in means and "rewards/undesirable" in means:
        (has_d, d), (has_u, u) = means["rewards/desirable"], means["rewards/undesirable"]
        means["rewards/margins"] = (has_d & has_u, d - u)
    for name, (present, mean) in means.items():
        out[MICROBATCH_PREFIX + name + "_sum"] = jnp.where(present, mean, 0.0)
        out[MICROBATCH_COUNT_PREFIX + name] = present.astype(jnp.float32)
    return out


def _is_microbatch_key(key: str) -> bool:
    return key.startswith(MICROBATCH_PREFIX) or key.startswith(MICROBATCH_COUNT_PREFIX)


def summarize_metrics(summed: Mapping[str, Array], averaging: str = "pooled") -> dict:
    """Readable metrics from summed additive metrics.

    Args:
      summed: metric dict(s) of one or more microbatches/steps/hosts, summed key-wise.
      averaging: "pooled" (kto-jax): each mean is the window's sum over its count;
        "microbatch" (TRL's logs): the names of `MICROBATCH_MEAN_NAMES` and
        `rewards/margins` are means over the microbatches that have them of each
        microbatch's mean (needs the entries of `microbatch_means`).

    Returns:
      A dict of Python floats: the counts as they are, each `X_sum` divided by its
      count (table `_MEANS`; any other `*_sum` key by `num_examples`, or by
      `count/tokens` when it ends in `_token_sum`), `rewards/margins` =
      rewards/desirable - rewards/undesirable when both are present. A mean whose
      count is 0 is ABSENT (an empty class has no mean; a window with one class only
      has no margin), never a made-up 0.
    """
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
    s = {k: float(v) for k, v in summed.items()}
    per_microbatch = {k: v for k, v in s.items() if _is_microbatch_key(k)}
    s = {k: v for k, v in s.items() if not _is_microbatch_key(k)}
    out = {}
    used = set()
    for name, (sum_key, count_key) in _MEANS.items():
        if sum_key in s and count_key in s:
            used.add(sum_key)
            if s[count_key] > 0:
                out[name] = s[sum_key] / s[count_key]
    for key, value in s.items():
        if key in used:
            continue
        if key.startswith("count/") or key in _COUNTS:
            out[key] = value
        elif key.endswith("_token_sum"):
            if s.get("count/tokens", 0.0) > 0:
                out[key[: -len("_token_sum")]] = value / s["count/tokens"]
        elif key.endswith("_sum"):
            if s.get("num_examples", 0.0) > 0:
                out[key[: -len("_sum")]] = value / s["num_examples"]
        else:
            out[key] = value
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["rewards/margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    if averaging == "microbatch":
        for name in MICROBATCH_MEAN_NAMES + ("rewards/margins",):
            count = per_microbatch.get(MICROBATCH_COUNT_PREFIX + name)
            if count is None:
                continue
            out.pop(name, None)
            if count > 0:
                out[name] = per_microbatch[MICROBATCH_PREFIX + name + "_sum"] / count
    return out
