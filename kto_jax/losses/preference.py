"""Losses on preference pairs (x, y_w, y_l): DPO/cDPO, IPO, SimPO, ORPO, SLiC, DiscoPOP, APO.

Inputs are per-sequence log-probs of shape [M] (M pairs): the chosen y_w is the
"desirable" side of the metrics and the rejected y_l the "undesirable" side, so
paired and unpaired runs log the same keys. Length-normalised losses also take
the completion token counts [M]. Each loss = mean over valid pairs of a per-pair
cost; metrics follow kto_jax.losses.common (sums and counts only).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from kto_jax.losses.common import Array, as_mask, f32, masked_sum, zero_masked


def pair_metrics(cost: Array, chosen_rewards: Array, rejected_rewards: Array,
                 chosen_logps: Array, rejected_logps: Array, mask: Array) -> dict:
    """Additive metrics of a paired loss; rewards are whatever the loss calls its implied reward."""
    sg = jax.lax.stop_gradient
    n = jnp.sum(mask)
    return {
        "loss_sum": sg(masked_sum(cost, mask)),
        "loss_denominator": n,
        "num_examples": n,
        "count/desirable": n,
        "count/undesirable": n,
        "rewards/desirable_sum": sg(masked_sum(chosen_rewards, mask)),
        "rewards/undesirable_sum": sg(masked_sum(rejected_rewards, mask)),
        "rewards/accuracies_sum": sg(masked_sum((chosen_rewards > rejected_rewards).astype(jnp.float32), mask)),
        "logps/desirable_sum": sg(masked_sum(chosen_logps, mask)),
        "logps/undesirable_sum": sg(masked_sum(rejected_logps, mask)),
    }


def _clean(mask: Array, *xs: Array) -> tuple[Array, ...]:
    """float32 copies of `xs` with invalid pairs zeroed (no NaN from filler rows)."""
    return tuple(zero_masked(f32(x), mask) for x in xs)


def _mean_loss(cost: Array, mask: Array) -> Array:
    return masked_sum(cost, mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _beta_log_ratios(mask: Array, beta: float, *logps: Array) -> tuple[Array, Array, Array, Array, Array]:
    """(mask, pw, pl, beta r_w, beta r_l): the cleaned inputs and each side's implied reward."""
    m = as_mask(mask, logps[0])
    pw, pl, rw, rl = _clean(m, *logps)
    return m, pw, pl, beta * (pw - rw), beta * (pl - rl)


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
             reference_chosen_logps: Array, reference_rejected_logps: Array, *,
             beta: float = 0.1, label_smoothing: float = 0.0,
             mask: Optional[Array] = None) -> tuple[Array, dict]:
    """DPO (Rafailov et al. 2023; App. B of the KTO paper), conservative DPO when label_smoothing > 0.

    h = beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))];
    cost = -(1 - eps) log sigma(h) - eps log sigma(-h), eps = label_smoothing: the cDPO
    formula (Mitchell 2023), as in HALOs. TRL 1.16's loss_type="sigmoid" ignores eps and
    its "robust" is a different loss (rDPO); see docs/losses.md.
    Rewards: beta * (log pi - log ref) per side.
    """
    m, pw, pl, chosen_rewards, rejected_rewards = _beta_log_ratios(
        mask, beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps)
    h = chosen_rewards - rejected_rewards
    cost = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    metrics = pair_metrics(cost, chosen_rewards, rejected_rewards, pw, pl, m)
    return _mean_loss(cost, m), metrics


def ipo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
             reference_chosen_logps: Array, reference_rejected_logps: Array,
             chosen_token_counts: Array, rejected_token_counts: Array, *,
             tau: float = 0.1, mask: Optional[Array] = None) -> tuple[Array, dict]:
    """IPO (Azar et al. 2023, eq. 17) on length-normalised log-ratios, as in TRL and HALOs.

    rho_y = (log pi(y) - log ref(y)) / |y|; cost = (rho_w - rho_l - 1 / (2 tau))^2.
    Rewards: rho per side.
    """
    m = as_mask(mask, policy_chosen_logps)
    pw, pl, rw, rl, nw, nl = _clean(m, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                    reference_rejected_logps, chosen_token_counts, rejected_token_counts)
    rho_w = (pw - rw) / jnp.maximum(nw, 1.0)
    rho_l = (pl - rl) / jnp.maximum(nl, 1.0)
    cost = jnp.square(rho_w - rho_l - 1.0 / (2.0 * tau))
    metrics = pair_metrics(cost, rho_w, rho_l, pw, pl, m)
    return _mean_loss(cost, m), metrics


def simpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
               chosen_token_counts: Array, rejected_token_counts: Array, *,
               beta: float = 2.0, gamma: float = 0.5,
               mask: Optional[Array] = None) -> tuple[Array, dict]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised.

    cost = -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).
    Rewards: beta/|y| log pi(y) per side.
    """
    m = as_mask(mask, policy_chosen_logps)
    pw, pl, nw, nl = _clean(m, policy_chosen_logps, policy_rejected_logps, chosen_token_counts,
                            rejected_token_counts)
    chosen_rewards = beta * pw / jnp.maximum(nw, 1.0)
    rejected_rewards = beta * pl / jnp.maximum(nl, 1.0)
    cost = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards - gamma)
    metrics = pair_metrics(cost, chosen_rewards, rejected_rewards, pw, pl, m)
    return _mean_loss(cost, m), metrics


def log1mexp(a: Array) -> Array:
    """log(1 - exp(a)) for a < 0, stable at both ends (Maechler 2012)."""
    a = jnp.minimum(a, -1e-7)
    return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def orpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
              chosen_token_counts: Array, rejected_token_counts: Array, *,
              lam: float = 0.1, mask: Optional[Array] = None) -> tuple[Array, dict]:
    """ORPO (Hong et al. 2024, eqs. 6-7): per-pair NLL of y_w plus lambda * odds-ratio loss.

    With a_y = log pi(y)/|y| (mean token log-prob) and log odds(y) = a_y - log(1 - e^{a_y}):
    cost = -a_{y_w} - lam * log sigma(log odds(y_w) - log odds(y_l)).
    The NLL is each chosen sequence's token mean (the paper's L_SFT), so the loss is
    a mean over pairs. Rewards: lam * a_y per side (as TRL logs them).
    """
    m = as_mask(mask, policy_chosen_logps)
    pw, pl, nw, nl = _clean(m, policy_chosen_logps, policy_rejected_logps, chosen_token_counts,
                            rejected_token_counts)
    a_w = pw / jnp.maximum(nw, 1.0)
    a_l = pl / jnp.maximum(nl, 1.0)
    log_odds = (a_w - log1mexp(a_w)) - (a_l - log1mexp(a_l))
    ratio_cost = -jax.nn.log_sigmoid(log_odds)
    cost = -a_w + lam * ratio_cost
    metrics = pair_metrics(cost, lam * a_w, lam * a_l, pw, pl, m)
    metrics["nll/desirable_sum"] = jax.lax.stop_gradient(masked_sum(-a_w, m))
    metrics["orpo/log_odds_sum"] = jax.lax.stop_gradient(masked_sum(log_odds, m))
    return _mean_loss(cost, m), metrics


def slic_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, *,
              delta: float = 1.0, lambda_reg: float = 0.1,
              mask: Optional[Array] = None) -> tuple[Array, dict]:
    """SLiC-HF (Zhao et al. 2023; section 3.3 and App. C of the KTO paper).

    cost = max(0, delta - log pi(y_w) + log pi(y_l)) + lambda_reg * (-log pi(y_w)):
    the calibration hinge plus the NLL of the desirable output (App. C: cross-entropy
    on the SFT targets instead of samples from pi_ref). No reference model.
    Rewards: log pi(y) per side.
    """
    m = as_mask(mask, policy_chosen_logps)
    lw, ll = _clean(m, policy_chosen_logps, policy_rejected_logps)
    cost = jnp.maximum(0.0, delta - lw + ll) + lambda_reg * (-lw)
    metrics = pair_metrics(cost, lw, ll, lw, ll, m)
    return _mean_loss(cost, m), metrics


def discopop_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
                  reference_chosen_logps: Array, reference_rejected_logps: Array, *,
                  beta: float = 0.05, tau: float = 0.05,
                  mask: Optional[Array] = None) -> tuple[Array, dict]:
    """DiscoPOP / LRML (Chris Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", log-ratio modulated loss, eq. 5).

    h = beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))] (DPO's logit);
    cost = (1 - sigma(h/tau)) (-log sigma(h)) + sigma(h/tau) exp(-h):
    a blend of DPO's logistic loss and an exponential loss, weighted by the
    log-ratio's sign and size (tau = 0.05 in the paper and TRL). The exponential
    term is evaluated as exp(log sigma(h/tau) - h), which stays finite for very
    negative h where exp(-h) alone overflows (for tau < 1). Rewards: beta * r per side.
    """
    m, pw, pl, chosen_rewards, rejected_rewards = _beta_log_ratios(
        mask, beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps)
    h = chosen_rewards - rejected_rewards
    modulation = jax.nn.sigmoid(h / tau)
    cost = -(1.0 - modulation) * jax.nn.log_sigmoid(h) + jnp.exp(jax.nn.log_sigmoid(h / tau) - h)
    metrics = pair_metrics(cost, chosen_rewards, rejected_rewards, pw, pl, m)
    return _mean_loss(cost, m), metrics


def apo_zero_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
                  reference_chosen_logps: Array, reference_rejected_logps: Array, *,
                  beta: float = 0.1, mask: Optional[Array] = None) -> tuple[Array, dict]:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7), paired.

    cost = (1 - sigma(beta r_w)) + sigma(beta r_l), r = log pi(y) - log ref(y): raise the
    chosen and lower the rejected likelihood, each against the reference (for chosen
    outputs better than the model's own). Rewards: beta * r per side.
    """
    m, pw, pl, chosen_rewards, rejected_rewards = _beta_log_ratios(
        mask, beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps)
    cost = (1.0 - jax.nn.sigmoid(chosen_rewards)) + jax.nn.sigmoid(rejected_rewards)
    metrics = pair_metrics(cost, chosen_rewards, rejected_rewards, pw, pl, m)
    return _mean_loss(cost, m), metrics


def apo_down_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
                  reference_chosen_logps: Array, reference_rejected_logps: Array, *,
                  beta: float = 0.1, mask: Optional[Array] = None) -> tuple[Array, dict]:
    """APO-down (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 8).

    cost = sigma(beta r_w) + (1 - sigma(beta (r_w - r_l))), r = log pi(y) - log ref(y):
    lower the chosen likelihood and the rejected one more (for chosen outputs worse
    than the model's own). Rewards: beta * r per side.
    """
    m, pw, pl, chosen_rewards, rejected_rewards = _beta_log_ratios(
        mask, beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps)
    cost = jax.nn.sigmoid(chosen_rewards) + (1.0 - jax.nn.sigmoid(chosen_rewards - rejected_rewards))
    metrics = pair_metrics(cost, chosen_rewards, rejected_rewards, pw, pl, m)
    return _mean_loss(cost, m), metrics
