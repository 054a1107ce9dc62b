"""The static part of the train step, as the runtime read it from the run's config: which
loss, its hyperparameters (with the resolved lambda weights), where the reference log-probs
come from, whether the reference follows the policy (TR-DPO syncing: `reference_sync`),
and what the train state is built with (LoRA, seed, reference dtype, sharding rules).

Nothing here reads a config: kto_jax/train/settings.py (`read_settings`) turns the
ConfigDict into these settings once, checks them and resolves what needs resolving
(LoRA and its init_from, the batch sizes); the run's lambda weights (eq. 9's when
config.loss.auto_weights; the data summary says which) come in with
`with_lambda_weights`, so the user's config is never rewritten.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kto_jax.batch import BatchSize
from kto_jax.losses.hparams import LossHparams
from kto_jax.losses.registry import HaloLoss
from kto_jax.models.logprobs import DEFAULT_VOCAB_CHUNK
from kto_jax.models.lora import LoraConfig

REFERENCE_SOURCES = ("model", "precomputed", "none")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static part of the step (see the module docstring)."""
    loss: HaloLoss
    hparams: LossHparams            # config.loss, lambda weights resolved
    reference_source: str           # config.reference.source, one of REFERENCE_SOURCES
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK   # config.train.logprob_vocab_chunk
    # packed batches (data.packing): the packer's groups, one per batch shard
    # (kto_jax/data/packing.py); the jitted builders set it from the mesh
    pack_groups: int = 1
    # (sync_every tau, sync_alpha alpha): every tau steps pi_ref <- alpha pi_theta + (1 - alpha)
    # pi_ref (config.reference.sync_every, or the loss's default: humanline); None: fixed
    reference_sync: tuple[int, float] | None = None
    batch: BatchSize | None = None  # config.train's batch sizes, checked against the mesh
    rules: tuple[tuple[str, Any], ...] = ()   # config.mesh.rules: logical axis -> mesh axes
    reference_dtype: str = "bfloat16"         # config.reference.param_dtype
    lora: LoraConfig | None = None  # config.lora resolved (init_from read); None: full training
    seed: int = 0                   # config.train.seed (the value head's initialiser)

    def with_lambda_weights(self, desirable_weight: float, undesirable_weight: float
                            ) -> StepSettings:
        """These settings training with (lambda_D, lambda_U): the run's resolved weights."""
        return dataclasses.replace(self, hparams=self.hparams.replace(
            desirable_weight=float(desirable_weight), undesirable_weight=float(undesirable_weight)))

    @property
    def initial_reference(self) -> bool:
        """Whether a LoRA run keeps a frozen copy of its starting adapter as the reference
        (lora.init_from set, the loss uses a reference, and it is computed by the model)."""
        return (self.lora is not None and bool(self.lora.init_from)
                and self.loss.uses_reference and self.reference_source == "model")
