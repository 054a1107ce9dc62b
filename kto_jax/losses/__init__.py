"""The HALO loss family: pure JAX functions on per-sequence log-probs (docs/losses.md).

The train step uses `get_loss(config.loss.name)`; see kto_jax/losses/registry.py for
the contract. The functions below are the public per-loss API.
"""

from kto_jax.losses.bco import bco_loss, running_mean_update
from kto_jax.losses.common import add_metrics, microbatch_means, summarize_metrics
from kto_jax.losses.kto import (CONCAVE, LINEAR, LOGISTIC, Value, apo_zero_unpaired_loss,
                                clamped_log_ratios, humanline_loss, kl_estimate, kto_concave_loss,
                                kto_family_loss, kto_loss, kto_no_z0_loss, kto_reference_free_loss,
                                kto_risk_neutral_loss, kto_value_loss, reference_point, v_concave,
                                v_kto, v_linear)
from kto_jax.losses.ppo import (gae, init_value_head, ppo_offline_loss, terminal_rewards,
                                value_head_apply)
from kto_jax.losses.preference import (apo_down_loss, apo_zero_loss, discopop_loss, dpo_loss,
                                       ipo_loss, orpo_loss, simpo_loss, slic_loss)
from kto_jax.losses.hparams import LossHparams
from kto_jax.losses.registry import (DEFAULT_LOSS, LOSS_NAMES, HaloLoss, ValueHead, get_loss,
                                     reward_loss)
from kto_jax.losses.sft import (BAD_TOKEN, GOOD_TOKEN, add_control_token, csft_loss,
                                csft_sampling_prompt, sft_desirable_loss, sft_loss)
from kto_jax.losses.weights import (balanced_weights, resolve_weights, weight_ratio,
                                    weight_ratio_in_range, weight_ratio_warning)

__all__ = [
    "bco_loss", "running_mean_update", "add_metrics", "microbatch_means", "summarize_metrics",
    "CONCAVE", "LINEAR", "LOGISTIC", "Value", "kto_value_loss",
    "apo_zero_unpaired_loss", "clamped_log_ratios", "humanline_loss", "kl_estimate",
    "kto_concave_loss",
    "kto_family_loss", "kto_loss", "kto_no_z0_loss", "kto_reference_free_loss",
    "kto_risk_neutral_loss", "reference_point", "v_concave", "v_kto", "v_linear", "gae",
    "init_value_head", "ppo_offline_loss", "terminal_rewards", "value_head_apply", "dpo_loss",
    "ipo_loss", "orpo_loss", "simpo_loss", "slic_loss", "discopop_loss", "apo_zero_loss",
    "apo_down_loss", "DEFAULT_LOSS", "LOSS_NAMES", "HaloLoss", "LossHparams", "ValueHead", "get_loss",
    "reward_loss",
    "BAD_TOKEN", "GOOD_TOKEN", "add_control_token", "csft_loss", "csft_sampling_prompt",
    "sft_desirable_loss", "sft_loss", "balanced_weights", "resolve_weights", "weight_ratio",
    "weight_ratio_in_range", "weight_ratio_warning",
]
