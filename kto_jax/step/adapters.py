"""LoRA in the train step: the frozen base and the trained adapters as the step's "params".

With LoRA on (config.lora, resolved by the runtime into `StepSettings.lora`; docs/lora.md)
the TrainState holds
  params            the adapters' nnx.LoRAParam state (`nnx.split(LoraAdapters)`): the ONLY
                    trained pytree (with offline PPO's value head), the only one with
                    optimizer moments and the only one checkpointed
  base_params       the base model's nnx.Param state in model.param_dtype, frozen,
                    never checkpointed (re-read from model.path on resume)
  reference_params  None (the reference is the base alone), or, with lora.init_from, a
                    frozen copy of the starting adapter (the reference is base + it)

and the step's graphdef is a `LoraGraph` (the base's and the adapters' graphdefs).
Every forward of kto_jax/step/stats.py builds its model with `model_of(graphdef, params)`,
where for LoRA `params` is a `LoraView` (base, adapters or None, dropout key): the
policy is `LoraView(base, adapters, key)`, the reference `LoraView(base, initial or None)`.
Both hold the SAME base arrays: one set of base weights for every forward, no copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx, struct

from kto_jax.models import lora as lora_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class LoraGraph:
    """The static structure of a LoRA policy: base and adapter graphdefs, adapter dropout."""
    base: nnx.GraphDef
    adapters: nnx.GraphDef
    dropout: float = 0.0


@struct.dataclass
class LoraView:
    """A model's arrays under LoRA: base Param state, adapter state (None: base alone) and,
    while training with config.lora.dropout > 0, a raw uint32 dropout key."""
    base: Any
    adapters: Any = None
    dropout_key: Any = None


def model_of(graphdef: Any, params: Any) -> nnx.Module:
    """The model of `params` (a full Param state, or a LoraView under a LoraGraph)."""
    if not isinstance(graphdef, LoraGraph):
        return nnx.merge(graphdef, params)
    base = nnx.merge(graphdef.base, params.base)
    adapters = None if params.adapters is None else nnx.merge(graphdef.adapters, params.adapters)
    return lora_lib.attach(base, adapters, dropout_key=params.dropout_key)


def policy_params(graphdef: Any, state: Any) -> Any:
    """The policy's arrays for `model_of`: state.params, or LoraView(base, adapters) under LoRA."""
    if not isinstance(graphdef, LoraGraph):
        return state.params
    return LoraView(state.base_params, state.params)


def frozen_inputs(graphdef: Any, state: Any, dropout_key: Array | None = None) -> Any:
    """What the step passes as "the reference": state.reference_params for full training, a
    LoraView(base, frozen initial adapter or None, dropout key for the policy) under LoRA."""
    if not isinstance(graphdef, LoraGraph):
        return state.reference_params
    return LoraView(state.base_params, state.reference_params, dropout_key)


def policy_and_reference(params: Any, reference: Any) -> tuple[Any, Any]:
    """(policy, reference) views for the stats: under LoRA the policy is the base with the
    trained adapters `params` (and the dropout key), the reference the base without it."""
    if not isinstance(reference, LoraView):
        return params, reference
    return (LoraView(reference.base, params, reference.dropout_key),
            reference.replace(dropout_key=None))


def microbatch_dropout_keys(graphdef: Any, rng: Array, step: Array, num_microbatches: int
                            ) -> Array | None:
    """[A, 2] raw uint32 keys, one per microbatch of step `step`, when LoRA dropout is on."""
    if not isinstance(graphdef, LoraGraph) or graphdef.dropout <= 0:
        return None
    keys = jax.random.split(jax.random.fold_in(rng, step), num_microbatches)
    return jax.random.key_data(keys)


def with_dropout_key(reference: Any, key: Array | None) -> Any:
    """`reference` (a frozen_inputs value) carrying this microbatch's dropout key."""
    return reference if key is None else reference.replace(dropout_key=key)
