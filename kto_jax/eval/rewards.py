"""Implied-reward metrics of a policy on held-out feedback: margins and reward accuracy.

The held-out file goes through the training data pipeline as the run's eval split
(same formats, chat template, truncation, batch layout and order), and every batch
through the train step's own `eval_step` (kto_jax/step/train_step.py) with the policy's and
the frozen reference's params: the forwards on (x, y) and on the KL pairs (x_i, y_{i+1})
within each microbatch, then the run's loss. Its additive metrics, summed over all
batches and summarised once, give loss, kl (z0), rewards/desirable,
rewards/undesirable, rewards/margins and the reward accuracy:
  paired losses: share of pairs with r(chosen) > r(rejected);
  KTO family: share of examples whose implied reward r = beta log pi/pi_ref lies on
    its label's side of the microbatch's reference point z0 (kto_jax.losses.kto).

Losses without a reference model or with a value head (sft, csft, ppo_offline)
have no implied reward of this form; their runs are scored with the default loss's
(KTO's) statistics, same beta (`kto_jax.losses.reward_loss`), and the result says so
('reward_loss').
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kto_jax.data import build_datasets
from kto_jax.losses import add_metrics, summarize_metrics
from kto_jax.losses.registry import get_loss, reward_loss
from kto_jax.step.state import TrainState
from kto_jax.step.train_step import eval_step
from kto_jax.train.settings import read_settings

def eval_config(config: ml_collections.ConfigDict, data_path: str) -> ml_collections.ConfigDict:
    """The run's config with `data_path` as its eval split (read whole, in file order, as
    the trainer's periodic evaluation reads data.eval_path), no subsampling, no eq. 9 re-fit."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.data.train_path = data_path
        c.data.eval_path = data_path
        c.data.eval_fraction = 0.0
        c.data.desirable_fraction = c.data.undesirable_fraction = 1.0
        c.data.one_y_per_x = False
        c.data.drop_remainder = False
        c.data.num_epochs = 1
        c.loss.auto_weights = False
        c.loss.name = reward_loss(get_loss(c.loss.name)).name
        if "lora" in c:   # the policy and the reference come as whole models
            c.lora.rank, c.lora.init_from = 0, ""
    return c


def feedback_batches(config: ml_collections.ConfigDict, tokenizer: Any, data_path: str
                     ) -> tuple[Iterable[dict], Any]:
    """(the eval batches [A, M, ...] over every row of data_path, the data summary): the
    same batches, hence the same per-microbatch z0, as the trainer's evaluation of that file."""
    data = build_datasets(read_settings(eval_config(config, data_path)).data, tokenizer)
    return data.eval_batches(), data.summary


def reward_metrics(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, policy: Any,
                   reference: Any, batches: Iterable[dict], to_device=None) -> dict[str, Any]:
    """The step's eval metrics of `policy` against `reference`, summed over `batches`.

    Args:
      config: the config of `eval_config` (its loss and beta are used).
      graphdef, policy, reference: the model graph and two nnx.Param states of it.
      batches: host batches [A, M, ...] (e.g. `feedback_batches`).
      to_device: optional callable placing a host batch on the mesh (default jnp.asarray).
    Returns:
      summarize_metrics' readable metrics plus 'rewards/accuracy', 'examples' and
      'reward_loss' (the loss whose statistics these are).
    """
    settings = read_settings(config).step
    state = TrainState(params=policy, opt_state=None, step=jnp.zeros((), jnp.int32),
                       skipped_updates=jnp.zeros((), jnp.int32), rng=jax.random.key(0),
                       reference_params=reference)
    fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, settings=settings))
    sums = None
    for batch in batches:
        device_batch = to_device(batch) if to_device else {k: jnp.asarray(v) for k, v in batch.items()}
        metrics = fn(state, device_batch)
        sums = metrics if sums is None else add_metrics(sums, metrics)
    if sums is None:
        return {}
    out = summarize_metrics(jax.device_get(sums))
    out.update({"rewards/accuracy": out.get("rewards/accuracies"), "reward_loss": config.loss.name,
                "examples": int(out.get("num_examples", 0))})
    return out
