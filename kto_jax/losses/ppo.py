"""Offline PPO with dummy +1/-1 rewards (section 3.3 and App. C), token level.

The paper's recipe, as in the authors' code (HALOs, one-step offline PPO):
- each completion earns a reward of +1 (desirable) or -1 (undesirable) on its
  last token and 0 elsewhere;
- pi_old is pi_ref and is never updated, so the per-token ratio is
  q_t = pi_theta(y_t|s_t) / pi_ref(y_t|s_t), clipped to [clip_low, clip_high] =
  [0.25, 4.0] (asymmetric and liberal, App. C);
- advantages by GAE (gamma, lam) from the value head's predictions, normalised over
  the microbatch's completion tokens, with no gradient;
- a KL penalty estimated on the label tokens only: mean_t (log pi_ref - log pi_theta)
  (the forward KL(pi_ref || pi_theta) on data drawn near pi_ref);
- a value head that is a 3-layer MLP on the policy's final hidden states, detached
  from the policy graph, trained by MSE to the discounted return.

loss = mean_t [max(-A_t q_t, -A_t clip(q_t))] + kl_coef * mean_t (log pi_ref - log pi_theta)
       + critic_coef * 0.5 * mean_t (V_t - G_t)^2, means over valid completion tokens.

Deviation (documented in docs/losses.md): the value target is the return
G_t = sum_{k>=t} gamma^(k-t) r_k, which includes r_t, so that V_t means the same
in GAE and in the value loss (HALOs' target starts at r_{t+1}).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from kto_jax.losses.common import Array, as_mask, f32, masked_sum, zero_masked


def init_value_head(rng: Array, hidden_size: int) -> dict:
    """float32 params of the 3-layer MLP value head: hidden -> hidden -> hidden -> 1 (ReLU between).

    Kernels use LeCun-normal init (fan-in scaling); the last layer starts at zero so the
    initial values are 0.
    """
    k1, k2 = jax.random.split(rng)
    init = jax.nn.initializers.lecun_normal()
    h = hidden_size
    return {
        "dense_0": {"kernel": init(k1, (h, h), jnp.float32), "bias": jnp.zeros((h,), jnp.float32)},
        "dense_1": {"kernel": init(k2, (h, h), jnp.float32), "bias": jnp.zeros((h,), jnp.float32)},
        "dense_2": {"kernel": jnp.zeros((h, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)},
    }


def value_head_apply(params: dict, hidden: Array) -> Array:
    """Values [..., T] from hidden states [..., T, H], computed in float32.

    The hidden states pass through `stop_gradient` first: the value loss trains the
    head only, never the policy (App. C).
    """
    x = jax.lax.stop_gradient(hidden).astype(jnp.float32)
    x = jax.nn.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    x = jax.nn.relu(x @ params["dense_1"]["kernel"] + params["dense_1"]["bias"])
    return (x @ params["dense_2"]["kernel"] + params["dense_2"]["bias"])[..., 0]


def terminal_rewards(desirable: Array, token_mask: Array) -> Array:
    """Dummy rewards [M, C]: +1 / -1 on each row's last valid token, 0 elsewhere."""
    c = token_mask.shape[-1]
    pos = jnp.arange(c)
    last = jnp.max(jnp.where(token_mask > 0, pos, -1), axis=-1, keepdims=True)
    score = jnp.where(jnp.asarray(desirable).astype(bool), 1.0, -1.0)[:, None]
    return jnp.where((pos == last) & (token_mask > 0), score, 0.0)


def gae(rewards: Array, values: Array, token_mask: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimates and discounted returns, both [M, C].

    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 past the end), A_t = delta_t + gamma lam A_{t+1},
    G_t = r_t + gamma G_{t+1}. Padded positions hold 0.
    """
    v = values * token_mask
    r = rewards * token_mask
    v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta = r + gamma * v_next - v

    def step(carry, xs):
        adv_next, ret_next = carry
        d, rt = xs
        adv = d + gamma * lam * adv_next
        ret = rt + gamma * ret_next
        return (adv, ret), (adv, ret)

    zeros = jnp.zeros(r.shape[:1], r.dtype)
    _, (adv, ret) = jax.lax.scan(step, (zeros, zeros), (delta.T, r.T), reverse=True)
    return adv.T * token_mask, ret.T * token_mask


def _normalize(x: Array, mask: Array) -> Array:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (biased variance)."""
    n = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum(jnp.square(x - mean) * mask) / n
    return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def ppo_offline_loss(policy_token_logps: Array, reference_token_logps: Array, values: Array,
                     completion_mask: Array, desirable: Array, *, clip_low: float = 0.25,
                     clip_high: float = 4.0, kl_coef: float = 0.1, critic_coef: float = 0.01,
                     gamma: float = 0.99, lam: float = 0.95,
                     mask: Optional[Array] = None) -> tuple[Array, dict]:
    """Token-level offline PPO loss (App. C); see the module docstring for the formula.

    Args:
      policy_token_logps, reference_token_logps: log pi(y_t | x, y_<t), [M, C] (right-padded).
      values: value-head outputs [M, C]; values[:, t] is V of the state before token t
        (the hidden state at the position whose logits give token t).
      completion_mask: [M, C] 1 on real completion tokens; desirable: bool [M]; mask: valid rows [M].

    Returns:
      (loss, metrics); loss = (token sums) / number of valid completion tokens.
    """
    tm = f32(completion_mask) * as_mask(mask, f32(desirable))[:, None]
    logp, ref_logp, values = (zero_masked(f32(x), tm) for x in
                              (policy_token_logps, reference_token_logps, values))
    rewards = terminal_rewards(desirable, tm)
    adv, returns = gae(rewards, jax.lax.stop_gradient(values), tm, gamma, lam)
    adv = jax.lax.stop_gradient(_normalize(adv, tm))
    log_ratio = logp - jax.lax.stop_gradient(ref_logp)
    ratio = jnp.exp(log_ratio)
    policy_term = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, clip_low, clip_high))
    kl_term = -log_ratio
    critic_term = 0.5 * jnp.square(values - jax.lax.stop_gradient(returns))
    per_token = policy_term + kl_coef * kl_term + critic_coef * critic_term
    tokens = jnp.sum(tm)
    loss_sum = masked_sum(per_token, tm)
    loss = loss_sum / jnp.maximum(tokens, 1.0)
    sg = jax.lax.stop_gradient
    m = as_mask(mask, f32(desirable))
    des = jnp.asarray(desirable).astype(jnp.float32)
    seq_logps = sg(jnp.sum(logp * tm, axis=-1))
    metrics = {
        "loss_sum": sg(loss_sum),
        "loss_denominator": tokens,
        "num_examples": jnp.sum(m),
        "count/tokens": tokens,
        "count/desirable": jnp.sum(m * des),
        "count/undesirable": jnp.sum(m * (1.0 - des)),
        "logps/desirable_sum": masked_sum(seq_logps, m * des),
        "logps/undesirable_sum": masked_sum(seq_logps, m * (1.0 - des)),
        "ppo/policy_token_sum": sg(masked_sum(policy_term, tm)),
        "ppo/kl_token_sum": sg(masked_sum(kl_term, tm)),
        "ppo/critic_token_sum": sg(masked_sum(critic_term, tm)),
        "ppo/clipfrac_token_sum": sg(masked_sum(((ratio < clip_low) | (ratio > clip_high)).astype(jnp.float32), tm)),
        "ppo/values_token_sum": sg(masked_sum(values, tm)),
    }
    return loss, metrics
