"""Class-imbalance controls of the paper's experiments (§4.3, eq. 9, App. C).

- `subsample_classes`: keep a seeded fraction of the desirable and/or undesirable
  examples (the paper drops up to 90% of the desirable data).
- `balanced_weights`, `weight_ratio`, `ratio_warning`: the eq. 9 rule of the losses
  package (`kto_jax.losses.weights`, one rule for the whole project): counts whose
  ratio lies in [1, 4/3] keep λ_D = λ_U = 1, otherwise the minority class is
  up-weighted to a ratio of 4/3 (1:10 data gives λ_D = 13.33, λ_U = 1, as in §4.3).
  Here they also handle a missing class, which has no ratio.
"""

from __future__ import annotations

import numpy as np

from kto_jax.losses import weights as losses_weights


def subsample_classes(desirable: np.ndarray, desirable_fraction: float,
                      undesirable_fraction: float, seed: int) -> np.ndarray:
    """Indices (ascending) of the examples kept after per-class subsampling.

    Each class keeps exactly round(n_class * fraction) examples, chosen without
    replacement by a generator seeded with `seed`.

    Args:
      desirable: bool [N], True for a desirable example.
      desirable_fraction, undesirable_fraction: shares in [0, 1] to keep.
    """
    rng = np.random.default_rng([seed, 2])
    keep = []
    for cls, fraction in ((True, desirable_fraction), (False, undesirable_fraction)):
        members = np.flatnonzero(desirable == cls)
        n_keep = int(round(len(members) * fraction))
        keep.append(rng.choice(members, size=n_keep, replace=False) if n_keep < len(members)
                    else members)
    return np.sort(np.concatenate(keep)).astype(np.int64)


def balanced_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float] | None:
    """(λ_D, λ_U) of eq. 9 (`kto_jax.losses.balanced_weights`); None if a class is empty."""
    if n_desirable <= 0 or n_undesirable <= 0:
        return None
    return tuple(float(w) for w in losses_weights.balanced_weights(n_desirable, n_undesirable))


def weight_ratio(desirable_weight: float, undesirable_weight: float, n_desirable: int,
                 n_undesirable: int) -> float | None:
    """λ_D·n_D / (λ_U·n_U) of eq. 9; None when undefined (a class is empty or λ_U = 0)."""
    if n_desirable <= 0 or undesirable_weight * n_undesirable <= 0:
        return None
    return losses_weights.weight_ratio(n_desirable, n_undesirable, desirable_weight,
                                       undesirable_weight)


def ratio_warning(desirable_weight: float, undesirable_weight: float, n_desirable: int,
                  n_undesirable: int, offer_auto_weights: bool = True) -> str | None:
    """A warning when λ_D·n_D / (λ_U·n_U) lies outside [1, 4/3] or a class is missing."""
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        return (f"the training data has no {missing} examples; KTO learns from both classes "
                "(check data.*_fraction and the labels).")
    return losses_weights.weight_ratio_warning(n_desirable, n_undesirable, desirable_weight,
                                               undesirable_weight, offer_auto_weights)
