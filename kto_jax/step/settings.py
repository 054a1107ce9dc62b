"""The static part of the train step, from the run's config: which loss, its hyperparameters
(with the resolved lambda weights), where the reference log-probs come from.

`StepSettings.from_config(config, lambda_weights=(lam_d, lam_u))` takes the weights the
run trains with (eq. 9's when config.loss.auto_weights; the data summary says which),
so the user's config is never rewritten; without them the config's own weights apply.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from kto_jax.errors import UserError
from kto_jax.logprobs import DEFAULT_VOCAB_CHUNK
from kto_jax.losses.registry import HaloLoss, get_loss

REFERENCE_SOURCES = ("model", "precomputed", "none")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static (hashable) part of the step, from the config."""
    loss: HaloLoss
    hparams: ml_collections.FrozenConfigDict   # config.loss, lambda weights resolved
    reference_source: str
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK
    # packed batches (data.packing): the packer's groups, one per batch shard
    # (kto_jax/data/packing.py); the jitted builders set it from the mesh
    pack_groups: int = 1

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict,
                    lambda_weights: tuple[float, float] | None = None) -> "StepSettings":
        """Settings of `config`'s step; `lambda_weights` = (lambda_D, lambda_U) replace the config's."""
        loss = get_loss(config.loss.name)
        check_step_config(config, loss)
        hparams = config.loss.to_dict()
        if lambda_weights is not None:
            hparams["desirable_weight"], hparams["undesirable_weight"] = map(float, lambda_weights)
        chunk = int(config.train.logprob_vocab_chunk)
        return cls(loss, ml_collections.FrozenConfigDict(hparams), config.reference.source, chunk)


def check_step_config(config: ml_collections.ConfigDict, loss: HaloLoss) -> None:
    """UserError for a batch shape or reference source the chosen loss cannot train with."""
    micro, total = int(config.train.micro_batch_size), int(config.train.global_batch_size)
    if loss.uses_kl and micro < 2:
        raise UserError(
            f"config.train.micro_batch_size={micro}: loss {loss.name!r} estimates z0 from the "
            "mismatched pairs (x_i, y_{i+1}) within a microbatch, which needs at least 2 "
            "examples. Set --config.train.micro_batch_size=2 or more.")
    if micro < 1 or total % micro:
        raise UserError(f"config.train.global_batch_size={total} must be a positive multiple of "
                        f"config.train.micro_batch_size={micro}.")
    source = config.reference.source
    if source not in REFERENCE_SOURCES:
        raise UserError(f"config.reference.source={source!r} is not one of {REFERENCE_SOURCES}.")
    if loss.uses_reference and source == "none":
        raise UserError(f"loss {loss.name!r} needs a reference model: set "
                        "config.reference.source to 'model' or 'precomputed'.")
    if loss.uses_token_logps and source == "precomputed":
        raise UserError(f"loss {loss.name!r} needs per-token reference log-probs, which the data "
                        "cannot carry: set config.reference.source='model'.")
