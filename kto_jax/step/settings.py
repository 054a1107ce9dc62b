"""The static part of the train step, from the run's config: which loss, its hyperparameters
(with the resolved lambda weights), where the reference log-probs come from, and whether
the reference follows the policy (TR-DPO syncing: `reference_sync`).

`StepSettings.from_config(config, lambda_weights=(lam_d, lam_u))` takes the weights the
run trains with (eq. 9's when config.loss.auto_weights; the data summary says which),
so the user's config is never rewritten; without them the config's own weights apply.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from kto_jax.errors import UserError
from kto_jax.models.logprobs import DEFAULT_VOCAB_CHUNK
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
    # (sync_every tau, sync_alpha alpha): every tau steps pi_ref <- alpha pi_theta + (1 - alpha)
    # pi_ref (config.reference.sync_every, or the loss's default: humanline); None: fixed
    reference_sync: tuple[int, float] | None = None

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
        return cls(loss, ml_collections.FrozenConfigDict(hparams), config.reference.source, chunk,
                   reference_sync=reference_sync(config, loss))


def reference_sync(config: ml_collections.ConfigDict, loss: HaloLoss) -> tuple[int, float] | None:
    """(tau, alpha) of the run's reference syncing, or None (a fixed reference).

    config.reference.sync_every > 0 sets tau (and sync_alpha alpha); 0 leaves the loss's own
    default (`HaloLoss.reference_sync`: humanline syncs every step with alpha = 1, as HALOs).
    """
    every = int(config.reference.get("sync_every", 0))
    if every > 0:
        return every, float(config.reference.get("sync_alpha", 0.6))
    return loss.reference_sync


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
    check_reference_sync(config, loss)


def check_reference_sync(config: ml_collections.ConfigDict, loss: HaloLoss) -> None:
    """UserError for reference syncing the run cannot do (docs/losses.md, "Reference syncing")."""
    every, alpha = int(config.reference.get("sync_every", 0)), float(config.reference.get("sync_alpha", 0.6))
    if every < 0:
        raise UserError(f"config.reference.sync_every={every} must be >= 0 (0: never sync).")
    if every > 0 and not 0.0 < alpha <= 1.0:
        raise UserError(f"config.reference.sync_alpha={alpha} must lie in (0, 1]: the weight of "
                        "the policy in pi_ref <- alpha pi_theta + (1 - alpha) pi_ref.")
    sync = reference_sync(config, loss)
    if sync is None:
        return
    why = (f"config.reference.sync_every={every}" if every > 0 else
           f"loss {loss.name!r} (which syncs its reference every {sync[0]} step(s))")
    if not loss.uses_reference:
        raise UserError(f"{why}: loss {loss.name!r} has no reference model to sync; set "
                        "--config.reference.sync_every=0.")
    if config.reference.source == "precomputed":
        raise UserError(f"{why} moves pi_ref towards the policy during training, which stored "
                        "reference log-probs cannot follow: set config.reference.source='model'"
                        + (" or --config.reference.sync_every=0." if every > 0 else "."))
    if int(config.get("lora", {}).get("rank", 0)) > 0:
        raise UserError(f"{why} with LoRA (config.lora.rank={config.lora.rank}): blending the "
                        "adapters' A and B factors is not a blend of the weights, so kto-jax does "
                        "not sync a LoRA reference. Train all parameters (lora.rank=0) to sync"
                        + (", or set --config.reference.sync_every=0." if every > 0 else "."))
