"""The train state: what it holds, how it is created, and where each of its arrays lives.

TrainState (a pytree):
  params            nnx.Param state of the policy (`nnx.split(model, nnx.Param)`)
  opt_state         optax state of the trainable pair (params, value_head)
  step              int32: train_step calls so far (skipped ones included)
  skipped_updates   int32: steps whose update was skipped for a non-finite loss/gradient
  rng               typed PRNG key (no randomness is consumed by the step today)
  value_head        the loss's value-head params (`HaloLoss.value_head`: offline PPO), else None
  reference_params  pi_ref (`reference_copy` of the initial policy in
                    `StepSettings.reference_dtype`) when the reference source is 'model'
                    and the loss uses a reference, else None. Without reference syncing
                    it never changes: a checkpoint may drop it
                    (`state.replace(reference_params=None)`) and rebuild it from the model
                    path. With syncing (`StepSettings.reference_sync`, TR-DPO) the step
                    blends the policy into it, so it must be checkpointed.
  base_params       under LoRA (`StepSettings.lora`), the frozen base Param state; `params` is then
                    the adapters and `reference_params` None or the frozen starting adapter
                    (kto_jax/step/adapters.py). Never checkpointed: re-read from model.path.
  loss_state        the loss's own small state (`HaloLoss.loss_state`: bco's running reward
                    mean and count) as a dict of replicated scalars, else None; the step
                    carries it across microbatches and steps; checkpointed.

`init_sharded_state` builds a state inside one jit whose outputs land on their
shardings (`train_state_shardings`), so the optimizer moments and the reference copy
are created where they live: a trainer's loaded policy and a benchmark's random init
alike, with no process placing host values on another's devices.
`abstract_train_state` gives the same state as ShapeDtypeStructs without allocating
(AOT lowering, Orbax restore targets).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kto_jax.sharding import logical_to_mesh, named_shardings
from kto_jax.models import lora as lora_lib
from kto_jax.step.adapters import LoraGraph, LoraView
from kto_jax.step.settings import StepSettings

Array = jax.Array


@struct.dataclass
class TrainState:
    """Everything the step updates; see the module docstring."""
    params: Any
    opt_state: Any
    step: Array
    skipped_updates: Array
    rng: Array
    value_head: Any = None
    reference_params: Any = None
    base_params: Any = None
    loss_state: Any = None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, nnx.Param state); a model must hold nothing but nnx.Param variables."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model holds non-Param state the step would drop: {rest}")
    return graphdef, params


def split_lora(base_model: nnx.Module, adapters: lora_lib.LoraAdapters, lora: lora_lib.LoraConfig
               ) -> tuple[LoraGraph, LoraView]:
    """(LoraGraph, LoraView(base Param state, adapter state)) of a LoRA policy: what
    `init_sharded_state`'s make_params returns and `abstract_train_state` starts from."""
    base_graph, base = split_model(base_model)
    adapter_graph, adapter_state = nnx.split(adapters)
    return LoraGraph(base_graph, adapter_graph, lora.dropout), LoraView(base, adapter_state)


def reference_copy(params: Any, dtype: str) -> Any:
    """The frozen reference pi_ref: a fresh copy of the policy's params in `dtype`
    (config.reference.param_dtype), never aliasing the policy's buffers."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.dtype(dtype), copy=True), params)


def init_train_state(settings: StepSettings, params: Any, tx: optax.GradientTransformation,
                     hidden_size: int) -> TrainState:
    """The initial TrainState around policy `params` (nnx.Param state, or under LoRA a
    `LoraView(base, adapters)`); pure, so it also runs under `jax.eval_shape` (see
    `abstract_train_state`) and inside jit (`init_sharded_state`)."""
    loss = settings.loss
    key, head_key = jax.random.split(jax.random.key(int(settings.seed)))
    value_head = loss.value_head.init(head_key, hidden_size) if loss.uses_value_head else None
    reference, base = None, None
    if isinstance(params, LoraView):  # LoRA: the reference is the base (+ the starting adapter)
        base, params = params.base, params.adapters
        if settings.initial_reference:
            reference = reference_copy(params, "float32")
    elif loss.uses_reference and settings.reference_source == "model":
        reference = reference_copy(params, settings.reference_dtype)
    loss_state = {k: jnp.asarray(v) for k, v in loss.initial_loss_state().items()} or None
    return TrainState(params=params, opt_state=tx.init((params, value_head)),
                      step=jnp.zeros((), jnp.int32), skipped_updates=jnp.zeros((), jnp.int32),
                      rng=key, value_head=value_head, reference_params=reference,
                      base_params=base, loss_state=loss_state)


def create_train_state(settings: StepSettings, model: nnx.Module,
                       tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, initial TrainState) of a run: policy params, optimizer state, reference, value head.

    The state's arrays stay where the model's params are; `init_sharded_state` creates
    them on their shardings instead.
    """
    graphdef, params = split_model(model)
    return graphdef, init_train_state(settings, params, tx, int(model.config.hidden_size))


def abstract_train_state(settings: StepSettings, model: nnx.Module,
                         tx: optax.GradientTransformation, adapters: Any = None
                         ) -> tuple[Any, TrainState]:
    """(graphdef, TrainState of ShapeDtypeStructs), allocating nothing: for AOT lowering and
    Orbax restore targets. `model` may be `kto_jax.models.transformer.abstract_model(cfg)`;
    with LoRA `adapters` (`kto_jax.models.lora.abstract_adapters`) the graphdef is a LoraGraph."""
    if adapters is not None:
        graphdef, params = split_lora(model, adapters, settings.lora)
    else:
        graphdef, params = split_model(model)
    init = functools.partial(init_train_state, settings, tx=tx,
                             hidden_size=int(model.config.hidden_size))
    return graphdef, jax.eval_shape(init, params)


def init_sharded_state(settings: StepSettings, tx: optax.GradientTransformation,
                       mesh: Mesh, hidden_size: int, make_params: Callable[..., Any], *args: Any,
                       donate: bool = False) -> tuple[TrainState, TrainState]:
    """(state, shardings): `init_train_state(settings, make_params(*args), ...)` in one jit.

    Its outputs carry `train_state_shardings`, so every array (params, optimizer moments,
    reference copy) is born on its devices. `make_params(*args)` returns the policy's
    nnx.Param state: e.g. the identity on params already loaded onto the mesh (with
    `donate=True`, their buffers become the state's), or a random init from a seed.
    """
    def create(*args):
        return init_train_state(settings, make_params(*args), tx, hidden_size)

    shardings = train_state_shardings(jax.eval_shape(create, *args), tx, mesh, settings.rules)
    donated = tuple(range(len(args))) if donate else ()
    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=shardings, donate_argnums=donated)(*args)
    return state, shardings


def train_state_shardings(state: TrainState, tx: optax.GradientTransformation, mesh: Mesh,
                          rules) -> TrainState:
    """NamedShardings for every leaf of `state` (concrete or abstract).

    Params and the frozen reference follow their logical axes through `rules`
    (config.mesh.rules); optimizer moments follow their params; counters, the key and
    the small value head are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    params = named_shardings(state.params, mesh, rules)
    head = jax.tree.map(lambda _: replicated, state.value_head)
    trainable = (params, head)
    # Optimizer leaves shaped like a param get its sharding; step counts are replicated.
    opt = optax.tree_map_params(
        tx, lambda _, s: s, state.opt_state, trainable,
        transform_non_params=lambda _: replicated)
    return TrainState(params=params, opt_state=opt, step=replicated, skipped_updates=replicated,
                      rng=replicated, value_head=head,
                      reference_params=None if state.reference_params is None else
                      named_shardings(state.reference_params, mesh, rules),
                      base_params=None if state.base_params is None else
                      named_shardings(state.base_params, mesh, rules),
                      loss_state=jax.tree.map(lambda _: replicated, state.loss_state))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of every batch array [A, M, ...]: A unsharded, M over the 'batch' rule's axes
    (and the rows R of a packed batch's [A, R, T] arrays alike: one packing group per shard)."""
    return NamedSharding(mesh, PartitionSpec(None, *logical_to_mesh(("batch",), rules, mesh=mesh)))
