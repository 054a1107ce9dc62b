"""Binary Classifier Optimization (BCO; Jung et al. 2024, "Binary Classifier Optimization
for Large Language Model Alignment", arXiv 2404.04656), unpaired.

The implied reward r = beta (log pi_theta(y|x) - log pi_ref(y|x)) is the logit of a
binary classifier of desirable vs undesirable outputs, shifted by a reward shift delta:

  desirable:   -log sigma(r - delta)
  undesirable: -log sigma(-(r - delta))

and delta is the running mean of every reward seen in training (both classes), as in
TRL's `BCOTrainer.bco_loss` with its `RunningMoments` (TRL <= 0.x; TRL 1.16 no longer
ships BCO). TRL updates the running mean with each microbatch's rewards BEFORE
computing that microbatch's loss, so delta includes the current microbatch:

  n' = n + m,  mu' = mu + (mean(r_batch) - mu) * m / n'   (m = the microbatch's valid rows)

`running_mean_update` is that rule; the loss applies it to the train state's
(mu, n) to get its delta, and the train step applies the same rule to carry (mu', n')
to the next microbatch (`BCO_STATE`, `update_bco_state`). In evaluation delta is the
running mean as it stands (TRL's do_train=False): `frozen=True`. No gradient flows
through delta. The optional underlying-distribution matching (UDM: a prompt
classifier reweighting undesirable examples) is not implemented (docs/losses.md).
"""

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.losses.common import Array, as_mask, f32, masked_sum, zero_masked

# the loss state of `bco` in the train state, as (key, initial value) pairs (hashable):
# the running mean of the rewards and how many rewards it averages
BCO_STATE = (("bco_delta", np.float32(0.0)), ("bco_count", np.int32(0)))


def running_mean_update(mean: Array, count: Array, batch_sum: Array,
                        batch_count: Array) -> tuple[Array, Array]:
    """(mu', n') after `batch_count` more values summing to `batch_sum` (TRL's RunningMoments mean).

    mu' = mu + (batch_sum / m - mu) * m / (n + m), n' = n + m; an empty batch (m = 0)
    leaves both unchanged. `count` is an int32 count of values (exact to 2^31).
    """
    m = f32(batch_count)
    total = count + jnp.asarray(batch_count).astype(count.dtype)
    batch_mean = f32(batch_sum) / jnp.maximum(m, 1.0)
    new_mean = f32(mean) + (batch_mean - f32(mean)) * m / jnp.maximum(f32(total), 1.0)
    return jnp.where(m > 0, new_mean, f32(mean)), total


def bco_loss(policy_logps: Array, reference_logps: Array, desirable: Array, *,
             running_mean: Array, running_count: Array, beta: float = 0.1,
             mask: Optional[Array] = None, weight: Optional[Array] = None,
             frozen: bool = False) -> tuple[Array, dict]:
    """BCO loss of one microbatch (see the module docstring for the equation and source).

    Args:
      policy_logps, reference_logps: per-sequence log-probs [M]; desirable: bool [M].
      running_mean, running_count: the running reward mean mu and its count n BEFORE
        this microbatch (the train state's loss state).
      mask: valid rows [M]; weight: per-example weight [M] (scored data; 1 in TRL).
      frozen: True in evaluation: delta = mu, not updated with this microbatch.

    Returns:
      (loss, metrics): loss = sum of weighted costs / valid rows. Metrics: the KTO
      family's (rewards = beta r; `rewards/accuracies` = share of rows whose reward is
      on its label's side of delta) plus `bco/delta_sum` (delta x rows, so
      `bco/delta` is the row-weighted delta) and `bco/rewards_sum` (sum of the rows'
      rewards, what updates the running mean, with `num_examples` as its count).
    """
    m = as_mask(mask, policy_logps)
    desirable = jnp.asarray(desirable).astype(bool)
    rewards = beta * (zero_masked(f32(policy_logps), m) - zero_masked(f32(reference_logps), m))
    n = jnp.sum(m)
    reward_sum = jax.lax.stop_gradient(masked_sum(rewards, m))
    if frozen:
        delta = f32(running_mean)
    else:
        delta, _ = running_mean_update(running_mean, running_count, reward_sum, n)
    delta = jax.lax.stop_gradient(delta)
    shifted = rewards - delta
    cost = -jax.nn.log_sigmoid(jnp.where(desirable, shifted, -shifted))
    w = jnp.ones_like(cost) if weight is None else zero_masked(f32(weight), m)
    loss_sum = masked_sum(w * cost, m)
    sg = jax.lax.stop_gradient
    d_mask, u_mask = m * desirable, m * (~desirable)
    logps = sg(zero_masked(f32(policy_logps), m))
    metrics = {
        "loss_sum": sg(loss_sum),
        "loss_denominator": n,
        "num_examples": n,
        "count/desirable": jnp.sum(d_mask),
        "count/undesirable": jnp.sum(u_mask),
        "rewards/desirable_sum": sg(masked_sum(rewards, d_mask)),
        "rewards/undesirable_sum": sg(masked_sum(rewards, u_mask)),
        "logps/desirable_sum": masked_sum(logps, d_mask),
        "logps/undesirable_sum": masked_sum(logps, u_mask),
        "rewards/accuracies_sum": sg(masked_sum(
            jnp.where(desirable, shifted > 0, shifted < 0).astype(jnp.float32), m)),
        "bco/delta_sum": delta * n,
        "bco/rewards_sum": reward_sum,
    }
    return loss_sum / jnp.maximum(n, 1.0), metrics


def update_bco_state(state: Mapping[str, Array], metrics: Mapping[str, Array]) -> dict:
    """The loss state after one training microbatch: its rewards added to the running mean."""
    mean, count = running_mean_update(state["bco_delta"], state["bco_count"],
                                      metrics["bco/rewards_sum"], metrics["num_examples"])
    return {"bco_delta": mean, "bco_count": count}
