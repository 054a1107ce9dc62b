"""Masked reductions and the metric convention shared by every loss.

Every loss returns `metrics` made only of additive quantities: masked sums (keys
ending in `_sum`) and counts (`num_examples`, `loss_denominator`, `count/...`).
Summing two metric dicts key by key gives the metrics of the union of the two
batches, so gradient accumulation (a scan over microbatches) and multi-host
reduction are exact. `summarize_metrics` turns summed metrics into readable means,
dividing by max(count, 1) so an empty class (say, an all-desirable batch) gives
finite values.
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
}
_COUNTS = ("num_examples", "loss_denominator")


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


def summarize_metrics(summed: Mapping[str, Array]) -> dict:
    """Readable metrics from summed additive metrics.

    Args:
      summed: metric dict(s) of one or more microbatches/steps/hosts, summed key-wise.

    Returns:
      A dict of Python floats: the counts as they are, each `X_sum` divided by its
      count (table `_MEANS`; any other `*_sum` key by `num_examples`, or by
      `count/tokens` when it ends in `_token_sum`), `rewards/margins` =
      rewards/desirable - rewards/undesirable when both are present.
    """
    s = {k: float(v) for k, v in summed.items()}
    out = {}
    used = set()
    for name, (sum_key, count_key) in _MEANS.items():
        if sum_key in s and count_key in s:
            out[name] = s[sum_key] / max(s[count_key], 1.0)
            used.add(sum_key)
    for key, value in s.items():
        if key in used:
            continue
        if key.startswith("count/") or key in _COUNTS:
            out[key] = value
        elif key.endswith("_token_sum"):
            out[key[: -len("_token_sum")]] = value / max(s.get("count/tokens", 0.0), 1.0)
        elif key.endswith("_sum"):
            out[key[: -len("_sum")]] = value / max(s.get("num_examples", 0.0), 1.0)
        else:
            out[key] = value
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["rewards/margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    return out
