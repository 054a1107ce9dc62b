"""Kahneman-Tversky Optimization (paper section 4.1, eq. 8) and its variants.

All functions take per-sequence log-probs, shape [M] for the M examples of one
microbatch: `policy_logps[i] = log pi_theta(y_i | x_i)` summed over completion
tokens, and `*_kl_logps[i] = log pi(y_{i+1 mod M} | x_i)` for the mismatched KL
pairs. The shared pieces are plain functions: the reference point z0
(`reference_point`) and the value functions (`v_kto`, `v_concave`, `v_linear`);
`kto_family_loss` combines a reward, a reference point and a value function, and
each named loss (`kto_loss`, `kto_no_z0_loss`, ...) is one such combination
(Tables 2 and 5 of the paper); the three with the microbatch z0 are one function,
`kto_value_loss`, given the value function (`LOGISTIC`, `CONCAVE`, `LINEAR`).

With u = beta (r - z0) for a desirable y and u = beta (z0 - r) for an undesirable
one, an example costs lambda_y (ceiling - v(u)) * weight, where ceiling = sup v
(1 for the logistic value, so the cost is lambda_y (1 - sigma(u)) as in eq. 8; 0
for the concave and linear values). The loss is the sum of costs over valid
examples divided by the number of valid examples (the authors' code and TRL).
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from kto_jax.losses.common import Array, as_mask, f32, masked_mean, masked_sum, zero_masked

ValueFn = Callable[[Array], Array]


def v_kto(u: Array) -> Array:
    """Logistic value sigma(u): concave in gains, convex in losses (section 4.1)."""
    return jax.nn.sigmoid(u)


def v_concave(u: Array) -> Array:
    """log sigma(u): concave everywhere, as DPO's implied value (Table 2 'concave')."""
    return jax.nn.log_sigmoid(u)


def v_linear(u: Array) -> Array:
    """Identity value: risk neutral (Table 2 'risk-neutral')."""
    return u


def kl_estimate(policy_kl_logps: Array, reference_kl_logps: Array,
                mask: Optional[Array] = None) -> Array:
    """mean_i [log pi_theta(y_j|x_i) - log pi_ref(y_j|x_i)], j = i+1 mod M: z0 before its clamp.

    The mean runs over the valid KL pairs (`mask`, [M]); no gradient flows through it.
    Logged as `kl/unclamped`, so a run can see how often the clamp at 0 binds.
    """
    m = as_mask(mask, policy_kl_logps)
    log_ratio = f32(policy_kl_logps) - f32(reference_kl_logps)
    return jax.lax.stop_gradient(masked_mean(log_ratio, m))


def reference_point(policy_kl_logps: Array, reference_kl_logps: Array,
                    mask: Optional[Array] = None) -> Array:
    """z0 = max(0, mean_i log pi_theta(y_j|x_i) / pi_ref(y_j|x_i)), j = i+1 mod M (section 4.1).

    The mean runs over the valid KL pairs of the microbatch (`mask`, [M]); see
    `kl_estimate`. No gradient flows through z0 (it only sets where the loss
    saturates). Under jit with the M axis sharded, the mean is over the whole
    (global) microbatch.
    """
    return jnp.maximum(kl_estimate(policy_kl_logps, reference_kl_logps, mask), 0.0)


def _example_costs(r: Array, z0: Array, desirable: Array, beta: float,
                   value_fn: ValueFn, ceiling: float, desirable_weight: float,
                   undesirable_weight: float, dynamic_desirable_weight: float) -> Array:
    """Per-example cost lambda_y (ceiling - v(u_y)) of eq. 8, plus the optional dynamic lambda_D term."""
    u = jnp.where(desirable, beta * (r - z0), beta * (z0 - r))
    lam = jnp.where(desirable, desirable_weight, undesirable_weight)
    cost = lam * (ceiling - value_fn(u))
    # Section 4.2: a larger lambda_D while r - z0 < 0. The extra delta (v(0) - v(u)) makes
    # the desirable slope (lambda_D + delta) v'(u) in the loss regime and keeps the cost
    # continuous at u = 0; the gain regime is unchanged. delta = 0 adds exactly 0.
    extra = dynamic_desirable_weight * (value_fn(jnp.zeros_like(u)) - value_fn(u))
    return cost + jnp.where(desirable & (u < 0), extra, 0.0)


def kto_family_loss(r: Array, z0: Array, desirable: Array, *, value_fn: ValueFn,
                    ceiling: float, beta: float = 0.1, desirable_weight: float = 1.0,
                    undesirable_weight: float = 1.0, mask: Optional[Array] = None,
                    weight: Optional[Array] = None, dynamic_desirable_weight: float = 0.0,
                    policy_logps: Optional[Array] = None) -> tuple[Array, dict]:
    """KTO-style loss for implied rewards `r` [M] against a scalar reference point `z0`.

    Args:
      r: log pi_theta(y|x) - log pi_ref(y|x), [M].
      z0: reference point (scalar, no gradient expected).
      desirable: bool [M]; mask: valid examples [M]; weight: per-example weight [M].
      policy_logps: [M], only for the `logps/*` metrics (defaults to r).

    Returns:
      (loss, metrics): loss = sum of weighted costs / number of valid examples.
    """
    m = as_mask(mask, r)
    r = zero_masked(f32(r), m)
    desirable = jnp.asarray(desirable).astype(bool)
    w = jnp.ones_like(r) if weight is None else zero_masked(f32(weight), m)
    cost = w * _example_costs(r, z0, desirable, beta, value_fn, ceiling, desirable_weight,
                              undesirable_weight, dynamic_desirable_weight)
    n = jnp.sum(m)
    loss_sum = masked_sum(cost, m)
    loss = loss_sum / jnp.maximum(n, 1.0)
    d_mask = m * desirable
    u_mask = m * (~desirable)
    rewards = jax.lax.stop_gradient(beta * r)
    logps = jax.lax.stop_gradient(r if policy_logps is None else zero_masked(f32(policy_logps), m))
    metrics = {
        "loss_sum": jax.lax.stop_gradient(loss_sum),
        "loss_denominator": n,
        "num_examples": n,
        "count/desirable": jnp.sum(d_mask),
        "count/undesirable": jnp.sum(u_mask),
        "rewards/desirable_sum": masked_sum(rewards, d_mask),
        "rewards/undesirable_sum": masked_sum(rewards, u_mask),
        "logps/desirable_sum": masked_sum(logps, d_mask),
        "logps/undesirable_sum": masked_sum(logps, u_mask),
        "kl_sum": jax.lax.stop_gradient(f32(z0)) * n,
        # reward accuracy of unpaired data: r on its label's side of the reference point
        "rewards/accuracies_sum": masked_sum(jnp.where(desirable, r > z0, r < z0).astype(jnp.float32), m),
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class Value:
    """A value function v of the KTO family and its supremum: an example costs
    lambda_y (ceiling - v(u_y)) (Table 2 of the paper)."""
    fn: ValueFn
    ceiling: float


LOGISTIC = Value(v_kto, 1.0)      # KTO, eq. 8: cost lambda_y (1 - sigma(u_y))
CONCAVE = Value(v_concave, 0.0)   # Table 2 'concave': cost lambda_y * -log sigma(u_y)
LINEAR = Value(v_linear, 0.0)     # Table 2 'risk-neutral': cost -lambda_y u_y (unbounded)

# additive count of microbatches with real rows but no KL pair (one real row): their z0 is 0
KL_UNPAIRED = "count/kl_unpaired_microbatches"


def kl_unpaired_microbatch(kl_mask: Array, n: Array) -> Array:
    """1.0 when a microbatch has valid rows but no valid KL pair (z0 falls back to 0), else 0.0.

    A microbatch with one real row has no mismatched completion to pair it with; the
    trainer warns once when a logged window counts any (`z0_warning`).
    """
    return ((n > 0) & (jnp.sum(f32(kl_mask)) == 0)).astype(jnp.float32)


def z0_warning(record: Mapping[str, Any]) -> str | None:
    """The warning for a logged window whose microbatches include one without KL pairs
    (the losses that estimate z0 report it: `HaloLoss.window_warnings`)."""
    count = record.get(KL_UNPAIRED) or 0
    if count <= 0:
        return None
    return (f"warning: {int(count)} microbatch(es) had a single real row, so no mismatched pair "
            "(x_i, y_j) to estimate z0 from: their z0 is 0 (section 4.1 needs >= 2 real rows). "
            "It happens in an epoch's last partial batch when it has fewer real rows than "
            "microbatches; --config.data.drop_remainder=True skips that batch. (Warned once.)")


def kto_value_loss(value: Value, policy_logps: Array, reference_logps: Array,
                   policy_kl_logps: Array, reference_kl_logps: Array, desirable: Array, *,
                   beta: float = 0.1, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0, mask: Optional[Array] = None,
                   weight: Optional[Array] = None, kl_mask: Optional[Array] = None,
                   dynamic_desirable_weight: float = 0.0) -> tuple[Array, dict]:
    """The KTO loss with value function `value` and the microbatch estimate of z0 (section 4.1).

    desirable: lambda_D (ceiling - v(beta (r - z0))); undesirable: lambda_U (ceiling - v(beta (z0 - r))),
    r = policy_logps - reference_logps, z0 = `reference_point` over `kl_mask` (default `mask`).
    With `LOGISTIC` this is eq. 8: lambda_D (1 - sigma(beta (r - z0))) and
    lambda_U (1 - sigma(beta (z0 - r))). `weight` scales each example's cost (scored data);
    `dynamic_desirable_weight` > 0 enables the section 4.2 dynamic lambda_D (see
    `_example_costs`). `kto_loss`, `kto_concave_loss` and `kto_risk_neutral_loss` are this
    function with `LOGISTIC`, `CONCAVE` and `LINEAR`.
    """
    kl_mask = mask if kl_mask is None else kl_mask
    unclamped = kl_estimate(policy_kl_logps, reference_kl_logps, kl_mask)
    r = f32(policy_logps) - f32(reference_logps)
    loss, metrics = kto_family_loss(r, jnp.maximum(unclamped, 0.0), desirable, value_fn=value.fn,
                                    ceiling=value.ceiling, beta=beta,
                                    desirable_weight=desirable_weight,
                                    undesirable_weight=undesirable_weight, mask=mask, weight=weight,
                                    dynamic_desirable_weight=dynamic_desirable_weight,
                                    policy_logps=policy_logps)
    metrics["kl/unclamped_sum"] = unclamped * metrics["num_examples"]
    metrics[KL_UNPAIRED] = kl_unpaired_microbatch(as_mask(kl_mask, r), metrics["num_examples"])
    return loss, metrics


kto_loss = functools.partial(kto_value_loss, LOGISTIC)                # eq. 8, the default KTO
kto_concave_loss = functools.partial(kto_value_loss, CONCAVE)         # Table 2 'concave'
kto_risk_neutral_loss = functools.partial(kto_value_loss, LINEAR)     # Table 2 'risk-neutral'


def kto_no_z0_loss(policy_logps: Array, reference_logps: Array, desirable: Array, *,
                   beta: float = 0.1, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0, mask: Optional[Array] = None,
                   weight: Optional[Array] = None,
                   dynamic_desirable_weight: float = 0.0) -> tuple[Array, dict]:
    """KTO with a constant reference point z0 = 0 (Tables 2 and 5, 'no z0'); no KL forward needed."""
    r = f32(policy_logps) - f32(reference_logps)
    return kto_family_loss(r, jnp.float32(0.0), desirable, value_fn=v_kto, ceiling=1.0, beta=beta,
                           desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                           mask=mask, weight=weight, dynamic_desirable_weight=dynamic_desirable_weight,
                           policy_logps=policy_logps)


def apo_zero_unpaired_loss(policy_logps: Array, reference_logps: Array, desirable: Array, *,
                           beta: float = 0.1, desirable_weight: float = 1.0,
                           undesirable_weight: float = 1.0, mask: Optional[Array] = None,
                           weight: Optional[Array] = None) -> tuple[Array, dict]:
    """TRL's `apo_zero_unpaired` (APO-zero, D'Oosterlinck et al. 2024, eq. 7, unpaired).

    desirable: lambda_D (1 - sigma(beta r)); undesirable: lambda_U sigma(beta r). Since
    sigma(beta r) = 1 - sigma(-beta r) this equals `kto_no_z0_loss` exactly.
    """
    return kto_no_z0_loss(policy_logps, reference_logps, desirable, beta=beta,
                          desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                          mask=mask, weight=weight)


def kto_reference_free_loss(policy_logps: Array, policy_kl_logps: Array, desirable: Array, *,
                            beta: float = 0.1, desirable_weight: float = 1.0,
                            undesirable_weight: float = 1.0, mask: Optional[Array] = None,
                            weight: Optional[Array] = None, kl_mask: Optional[Array] = None,
                            dynamic_desirable_weight: float = 0.0) -> tuple[Array, dict]:
    """KTO with a uniform pi_ref (section 4.3 'no pi_ref'; the paper uses lambda_D = 1.75).

    A uniform pi_ref gives every y the same log pi_ref(y|x) = -log|Y| = -c. Then
    r = log pi_theta(y|x) + c and the KL estimate is mean_i log pi_theta(y_j|x_i) + c;
    with |Y| = V^L the constant c dwarfs any log-prob, so the clamp at 0 never binds
    and c cancels: r - z0 = log pi_theta(y|x) - mean_i log pi_theta(y_j|x_i), i.e. the
    log-prob minus an estimate of -H(pi_theta) (no gradient through it). Rewards in
    the metrics are beta * log pi_theta(y|x).
    """
    m = as_mask(mask if kl_mask is None else kl_mask, policy_kl_logps)
    z0 = jax.lax.stop_gradient(masked_mean(f32(policy_kl_logps), m))
    loss, metrics = kto_family_loss(f32(policy_logps), z0, desirable, value_fn=v_kto, ceiling=1.0,
                                    beta=beta, desirable_weight=desirable_weight,
                                    undesirable_weight=undesirable_weight, mask=mask, weight=weight,
                                    dynamic_desirable_weight=dynamic_desirable_weight)
    metrics[KL_UNPAIRED] = kl_unpaired_microbatch(m, metrics["num_examples"])
    return loss, metrics


def clamped_log_ratios(policy_token_logps: Array, reference_token_logps: Array, token_mask: Array,
                       log_eps_p: float, log_eps_r: float) -> tuple[Array, Array]:
    """(sum_t clamp(log pi_theta(y_t) - log pi_ref(y_t), log eps_P, log eps_R), unclamped tokens).

    Humanline's per-token clamp of the log-ratio (HALOs, `BasicTrainer.get_sequence_rewards`
    with config.humanline). Args are [M, C] with `token_mask` 1 on the real completion
    tokens. Returns the clamped sequence log-ratios [M] and, per row, how many real
    tokens lie strictly inside (log eps_P, log eps_R) [M]. The clamp passes no gradient
    to a token outside the interval.
    """
    tm = f32(token_mask)
    lp, lr = zero_masked(f32(policy_token_logps), tm), zero_masked(f32(reference_token_logps), tm)
    log_ratio = lp - lr
    clamped = jnp.clip(log_ratio, log_eps_p, log_eps_r)
    inside = ((log_ratio > log_eps_p) & (log_ratio < log_eps_r)).astype(jnp.float32)
    return jnp.sum(clamped * tm, axis=-1), jax.lax.stop_gradient(jnp.sum(inside * tm, axis=-1))


def humanline_loss(policy_token_logps: Array, reference_token_logps: Array, completion_mask: Array,
                   policy_kl_token_logps: Array, reference_kl_token_logps: Array,
                   kl_completion_mask: Array, desirable: Array, *, beta: float = 0.1,
                   log_eps_p: float = -1.0, log_eps_r: float = 1.5,
                   desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                   mask: Optional[Array] = None, weight: Optional[Array] = None,
                   kl_mask: Optional[Array] = None,
                   dynamic_desirable_weight: float = 0.0) -> tuple[Array, dict]:
    """Humanline KTO: eq. 8 on per-token clamped log-ratios (the KTO authors' HALOs, `humanline`).

    Source: ContextualAI/HALOs `train/trainers.py` (`get_sequence_rewards` and
    `KTOTrainer.loss` with config.humanline; defaults log_epsilon_P = -1.0,
    log_epsilon_R = 1.5 in `config/config.yaml`). Each token's log-ratio
    log pi_theta(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t) is clamped to [log eps_P, log eps_R]
    BEFORE the sum over tokens, for the matched completion (r) and for the KL pairs alike:

      r = sum_t clamp(log-ratio_t), z0 = max(0, mean_i sum_t clamp(KL log-ratio_t)),
      desirable: lambda_D (1 - sigma(beta (r - z0))); undesirable: lambda_U (1 - sigma(beta (z0 - r))).

    HALOs pairs it with a reference that follows the policy (synced every step:
    docs/losses.md, "Reference syncing"). Arrays are [M, C] (token level) and [M].
    Extra metrics: `humanline/unclamped_token_sum` (real matched tokens inside the
    interval) and `count/tokens`, i.e. `humanline/unclamped` = the share of tokens the
    clamp leaves alone.
    """
    r, inside = clamped_log_ratios(policy_token_logps, reference_token_logps, completion_mask,
                                   log_eps_p, log_eps_r)
    r_kl, _ = clamped_log_ratios(policy_kl_token_logps, reference_kl_token_logps,
                                 kl_completion_mask, log_eps_p, log_eps_r)
    policy_logps = jnp.sum(zero_masked(f32(policy_token_logps), f32(completion_mask)), axis=-1)
    loss, metrics = kto_value_loss(LOGISTIC, r, jnp.zeros_like(r), r_kl, jnp.zeros_like(r_kl),
                                   desirable, beta=beta, desirable_weight=desirable_weight,
                                   undesirable_weight=undesirable_weight, mask=mask, weight=weight,
                                   kl_mask=kl_mask,
                                   dynamic_desirable_weight=dynamic_desirable_weight)
    m = as_mask(mask, r)
    # `kto_value_loss` took r as the policy log-probs: log the real ones
    d_mask, u_mask = m * jnp.asarray(desirable).astype(bool), m * ~jnp.asarray(desirable).astype(bool)
    metrics["logps/desirable_sum"] = jax.lax.stop_gradient(masked_sum(policy_logps, d_mask))
    metrics["logps/undesirable_sum"] = jax.lax.stop_gradient(masked_sum(policy_logps, u_mask))
    metrics["humanline/unclamped_token_sum"] = masked_sum(inside, m)
    metrics["count/tokens"] = masked_sum(jnp.sum(f32(completion_mask), axis=-1), m)
    return loss, metrics
