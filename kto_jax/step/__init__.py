"""The pure train step: jittable functions of (state, batch), and what describes them.

Nothing here reads files, writes logs or holds a run; kto_jax/train/ drives these
functions, and kto_jax/perf/ compiles them ahead of time (docs/architecture.md).

  settings     StepSettings: the static part of the step (loss, hparams with the
               resolved lambda weights, reference source, LoRA, rules), as the runtime
               read it from the config (kto_jax/train/settings.py)
  state        TrainState, its shardings, `reference_copy`, `init_sharded_state`
  adapters     LoRA in the step: LoraGraph, LoraView (base + adapters), `model_of`
  stats        the forwards of one microbatch, and `reference_logps`: THE reference forward
  train_step   train_step / eval_step / reference_step and their jitted builders
  optimizer    OptimSettings, the optax chain and schedule
  flops        model FLOPs of a step, MFU

The names below are the package's API (`from kto_jax import step`); the pure step
functions themselves are `step.train_step.train_step` / `eval_step` / `reference_step`,
and `flops` is imported by name. The batch layout the step reads is kto_jax/batch.py,
below both the data pipeline that writes it and this package.
"""

from kto_jax.step.optimizer import OptimSettings, make_optimizer, make_schedule
from kto_jax.step.settings import REFERENCE_SOURCES, StepSettings
from kto_jax.step.state import (TrainState, abstract_train_state, batch_sharding,
                                create_train_state, init_sharded_state, init_train_state,
                                reference_copy, split_lora, split_model, train_state_shardings)
from kto_jax.step.stats import MATCHED_ONLY, reference_keys, reference_logps
from kto_jax.step.train_step import (check_batch, make_eval_step, make_reference_step,
                                     make_train_step, on_mesh)

__all__ = [
    "OptimSettings", "make_optimizer", "make_schedule", "REFERENCE_SOURCES", "StepSettings",
    "TrainState", "abstract_train_state", "batch_sharding", "create_train_state",
    "init_sharded_state", "init_train_state", "reference_copy", "split_lora", "split_model",
    "train_state_shardings", "MATCHED_ONLY", "reference_keys", "reference_logps", "check_batch",
    "make_eval_step", "make_reference_step", "make_train_step", "on_mesh",
]
