"""Supervised baselines: SFT and conditional SFT (CSFT, section 3.3 and App. C).

SFT is the token-mean negative log-likelihood of the desirable completions. CSFT
(Korbak et al. 2023) trains the same NLL on every completion, each prefixed with a
control token, `<|good|>` for desirable and `<|bad|>` for undesirable outputs
(App. C; the prefix is part of the trained completion, as in the authors' code);
at sampling time the good token is appended to the prompt so the model continues
in the good mode. `add_control_token` and `csft_sampling_prompt` are the text
transforms; the data pipeline applies the first before tokenising.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from kto_jax.losses.common import Array, as_mask, f32, masked_sum, zero_masked

GOOD_TOKEN = "<|good|>"
BAD_TOKEN = "<|bad|>"
CONTROL_TOKENS = (GOOD_TOKEN, BAD_TOKEN)


def add_control_token(completion: str, desirable: bool) -> str:
    """CSFT training transform: `<|good|>` / `<|bad|>` directly before the completion text."""
    return (GOOD_TOKEN if desirable else BAD_TOKEN) + completion


def csft_sampling_prompt(prompt: str) -> str:
    """CSFT generation transform: the prompt followed by `<|good|>`, where the completion starts."""
    return prompt + GOOD_TOKEN


def sft_loss(policy_logps: Array, token_counts: Array, *,
             mask: Optional[Array] = None) -> tuple[Array, dict]:
    """Token-mean NLL: -sum_i log pi(y_i|x_i) / sum_i |y_i| over the examples in `mask` [M].

    The denominator is the token count, so the step must weight microbatches by
    `metrics['loss_denominator']` (tokens here) for the token mean to be exact.
    """
    m = as_mask(mask, f32(policy_logps))
    logps = zero_masked(f32(policy_logps), m)
    tokens = masked_sum(zero_masked(f32(token_counts), m), m)
    nll_sum = masked_sum(-logps, m)
    loss = nll_sum / jnp.maximum(tokens, 1.0)
    metrics = {
        "loss_sum": jax.lax.stop_gradient(nll_sum),
        "loss_denominator": tokens,
        "num_examples": jnp.sum(m),
        "count/tokens": tokens,
    }
    return loss, metrics


def sft_desirable_loss(policy_logps: Array, token_counts: Array, desirable: Array, *,
                       mask: Optional[Array] = None) -> tuple[Array, dict]:
    """SFT on an unpaired batch: the NLL of the desirable examples only."""
    d = as_mask(mask, f32(policy_logps)) * jnp.asarray(desirable).astype(jnp.float32)
    loss, metrics = sft_loss(policy_logps, token_counts, mask=d)
    metrics["count/desirable"] = jnp.sum(d)
    metrics["logps/desirable_sum"] = jax.lax.stop_gradient(masked_sum(zero_masked(f32(policy_logps), d), d))
    return loss, metrics


def csft_loss(policy_logps: Array, token_counts: Array, desirable: Array, *,
              mask: Optional[Array] = None) -> tuple[Array, dict]:
    """CSFT: token-mean NLL over all valid completions (both classes, control tokens included)."""
    m = as_mask(mask, f32(policy_logps))
    des = jnp.asarray(desirable).astype(jnp.float32)
    loss, metrics = sft_loss(policy_logps, token_counts, mask=m)
    logps = jax.lax.stop_gradient(zero_masked(f32(policy_logps), m))
    metrics.update({
        "count/desirable": jnp.sum(m * des),
        "count/undesirable": jnp.sum(m * (1.0 - des)),
        "logps/desirable_sum": masked_sum(logps, m * des),
        "logps/undesirable_sum": masked_sum(logps, m * (1.0 - des)),
    })
    return loss, metrics
