"""Class weights lambda_D, lambda_U for imbalanced binary feedback (section 4.2, eq. 9).

The paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]: the authors' code and
App. C ("an effective ratio of desirable:undesirable examples of 4:3"); the printed
eq. 9 says [1, 3/2], whose lower part [1, 4/3] both sources agree on. `balanced_weights`
keeps the MAJORITY class's weight at 1 and raises the minority's weight, as in the
paper's example (1:10 data: lambda_U = 1, lambda_D = 13.33).
"""

from typing import Any, Mapping, Optional

from kto_jax.errors import UserError
from kto_jax.losses.hparams import LossHparams

RATIO_LOW = 1.0
RATIO_HIGH = 4.0 / 3.0


def weight_ratio(n_desirable: int, n_undesirable: int, desirable_weight: float,
                 undesirable_weight: float) -> float:
    """lambda_D n_D / (lambda_U n_U); inf when there are no undesirable examples."""
    denom = undesirable_weight * n_undesirable
    return float("inf") if denom == 0 else desirable_weight * n_desirable / denom


def weight_ratio_in_range(n_desirable: int, n_undesirable: int, desirable_weight: float,
                          undesirable_weight: float, low: float = RATIO_LOW,
                          high: float = RATIO_HIGH, rtol: float = 1e-6) -> bool:
    """Whether eq. 9 holds: low <= lambda_D n_D / (lambda_U n_U) <= high (inclusive, with rtol)."""
    r = weight_ratio(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    return low * (1 - rtol) <= r <= high * (1 + rtol)


def balanced_weights(n_desirable: int, n_undesirable: int,
                     target: float = RATIO_HIGH) -> tuple[float, float]:
    """(lambda_D, lambda_U) satisfying eq. 9 for counts n_D, n_U.

    If the unweighted ratio n_D / n_U already lies in [1, 4/3], both weights stay 1.
    Otherwise the weighted ratio is set to `target` (default 4/3, the App. C optimum;
    1.0 matched the paper's UltraFeedback runs) by keeping the majority class's weight
    at 1 and raising the minority's: n_D < n_U gives lambda_U = 1, lambda_D = target
    n_U / n_D; n_D > (4/3) n_U gives lambda_D = 1, lambda_U = n_D / (target n_U).
    With one class absent there is nothing to balance: (1, 1).
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise UserError(f"example counts must be >= 0, got n_desirable={n_desirable}, n_undesirable={n_undesirable}")
    if not RATIO_LOW <= target <= RATIO_HIGH:
        raise UserError(f"eq. 9 target ratio must lie in [1, 4/3], got {target}")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    if weight_ratio_in_range(n_desirable, n_undesirable, 1.0, 1.0):
        return 1.0, 1.0
    if n_desirable < n_undesirable:
        return target * n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / (target * n_undesirable)


def weight_ratio_warning(n_desirable: int, n_undesirable: int, desirable_weight: float,
                         undesirable_weight: float, offer_auto_weights: bool = True) -> Optional[str]:
    """A message for the log when eq. 9 does not hold (None when it does or a class is empty);
    it offers loss.auto_weights only where the command takes it (`kto-jax online` does not)."""
    if n_desirable == 0 or n_undesirable == 0:
        return None
    if weight_ratio_in_range(n_desirable, n_undesirable, desirable_weight, undesirable_weight):
        return None
    r = weight_ratio(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    lam_d, lam_u = balanced_weights(n_desirable, n_undesirable)
    return (f"lambda_D n_D / (lambda_U n_U) = {r:.3g} with n_D={n_desirable}, n_U={n_undesirable}, "
            f"lambda_D={desirable_weight}, lambda_U={undesirable_weight} is outside the paper's [1, 4/3] "
            f"(eq. 9); set {'--config.loss.auto_weights=True or ' if offer_auto_weights else ''}"
            f"e.g. --config.loss.desirable_weight={lam_d:.4g} --config.loss.undesirable_weight={lam_u:.4g}")


def resolve_weights(hparams: Mapping[str, Any], n_desirable: int,
                    n_undesirable: int) -> LossHparams:
    """`hparams` (config.loss) with eq. 9 weights filled in when `auto_weights` is set.

    The library form of the rule; a run takes its weights from the data summary
    (`kto_jax.data.DataSummary`, which also leaves the weights alone when a class is
    empty) and the losses read only desirable_weight / undesirable_weight.
    """
    out = LossHparams(hparams)
    if out.get("auto_weights", False):
        lam_d, lam_u = balanced_weights(n_desirable, n_undesirable)
        out = out.replace(desirable_weight=lam_d, undesirable_weight=lam_u)
    return out
