"""The train step: one pure function `(state, batch) -> (state, metrics)`, jitted and sharded.

API (what the trainer and the AOT compiler call):

    loss = get_loss(config.loss.name)                  # kto_jax.losses
    tx, schedule = make_optimizer(config.optim, num_steps)   # kto_jax.train.optimizer
    graphdef, state = create_train_state(config, model, tx)  # model: kto_jax Transformer
    shardings = train_state_shardings(state, tx, mesh, config.mesh.rules)
    state = jax.device_put(state, shardings)           # no-op when already placed
    train_step = make_train_step(config, graphdef, tx, schedule, mesh, shardings)
    state, metrics = train_step(state, batch)          # `state` is donated
    eval_step = make_eval_step(config, graphdef, mesh, shardings)
    metrics = eval_step(state, batch)
    summarize_metrics(jax.device_get(metrics))         # kto_jax.losses; host side

`abstract_train_state(config, abstract_model(cfg), tx)` gives the same state as
ShapeDtypeStructs without allocating, so the AOT compiler can lower `train_step` with
abstract arguments (`batch_sharding(mesh, rules)` gives the batch's sharding; every
batch array is [A, M, ...]).

TrainState (a pytree):
  params            nnx.Param state of the policy (`nnx.split(model, nnx.Param)`)
  opt_state         optax state of the trainable pair (params, value_head)
  step              int32: train_step calls so far (skipped ones included)
  skipped_updates   int32: steps whose update was skipped for a non-finite loss/gradient
  rng               typed PRNG key (no randomness is consumed by the step today)
  value_head        offline PPO's value-head params (kto_jax.losses.init_value_head), else None
  reference_params  frozen pi_ref (a copy of the initial policy in
                    config.reference.param_dtype) when config.reference.source == 'model'
                    and the loss uses a reference, else None. It never changes: a
                    checkpoint may drop it (`state.replace(reference_params=None)`) and
                    rebuild it from the model path.

Inside the step (DESIGN.md "data path"): a `lax.scan` over the A microbatches; per
microbatch the stats of kto_jax/train/step_stats.py (KL batch rolled within the
microbatch, its own z0) and the loss's gradient, weighted by the loss's true
denominator (`loss_denominator`: examples, or tokens for token-mean losses), so the
accumulated gradient is that of sum_a loss_sum_a / sum_a denominator_a. The policy and
the value head share one optimizer, so global-norm clipping sees both (the value head's
gradient never reaches the policy: it reads detached hidden states). A non-finite loss
or gradient leaves params and optimizer state unchanged and counts a skip; `step`
still advances, the schedule (indexed by applied updates) does not.

metrics (jax scalars): the loss's additive metrics summed over microbatches (pass
several steps' sums, added key-wise, to `summarize_metrics`), plus `tokens` (real
tokens of the matched sequences, additive) and the per-step values `grad_norm`
(before clipping), `lr` (the rate this step used) and `skipped_updates` (running total).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kto_jax.batch import PAIRED_KEYS, UNPAIRED_KEYS
from kto_jax.errors import UserError
from kto_jax.logprobs import DEFAULT_VOCAB_CHUNK
from kto_jax.losses.ppo import init_value_head
from kto_jax.losses.registry import HaloLoss, get_loss
from kto_jax.sharding import activation_sharding, logical_to_mesh, named_shardings
from kto_jax.train import step_stats

Array = jax.Array
Batch = Mapping[str, Array]
REFERENCE_SOURCES = ("model", "precomputed", "none")


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


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static (hashable) part of the step, from the config."""
    loss: HaloLoss
    hparams: ml_collections.FrozenConfigDict
    reference_source: str
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "StepSettings":
        loss = get_loss(config.loss.name)
        check_step_config(config, loss)
        chunk = int(config.train.logprob_vocab_chunk)
        return cls(loss, ml_collections.FrozenConfigDict(config.loss), config.reference.source, chunk)


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


def check_batch(batch: Batch, loss: HaloLoss) -> None:
    """UserError (at trace time) for a batch whose layout or microbatch size the loss cannot use."""
    keys = PAIRED_KEYS if loss.paired else UNPAIRED_KEYS
    missing = [k for k in keys if k not in batch]
    if missing:
        layout = "paired (chosen/rejected)" if loss.paired else "unpaired (completion + label)"
        raise UserError(f"loss {loss.name!r} trains on {layout} batches, but the batch lacks "
                        f"{missing}: use data of that kind (config.data.format) or another "
                        "config.loss.name.")
    if loss.uses_kl and batch["valid"].shape[1] < 2:
        raise UserError(f"loss {loss.name!r} needs microbatches of at least 2 examples for z0 "
                        f"(the KL pairs), got {batch['valid'].shape[1]}.")


# ---------------------------------------------------------------- state

def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, nnx.Param state); a model must hold nothing but nnx.Param variables."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model holds non-Param state the step would drop: {rest}")
    return graphdef, params


def _copy_as(params: Any, dtype: str) -> Any:
    """A fresh copy of every leaf in `dtype` (never aliasing the policy's buffers)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.dtype(dtype), copy=True), params)


def init_train_state(config: ml_collections.ConfigDict, params: Any,
                     tx: optax.GradientTransformation, hidden_size: int) -> TrainState:
    """The initial TrainState around policy `params` (nnx.Param state); pure, so it also runs
    under `jax.eval_shape` (see `abstract_train_state`)."""
    settings = StepSettings.from_config(config)
    loss = settings.loss
    key, head_key = jax.random.split(jax.random.key(int(config.train.seed)))
    value_head = init_value_head(head_key, hidden_size) if loss.uses_value_head else None
    reference = None
    if loss.uses_reference and settings.reference_source == "model":
        reference = _copy_as(params, config.reference.param_dtype)
    return TrainState(params=params, opt_state=tx.init((params, value_head)),
                      step=jnp.zeros((), jnp.int32), skipped_updates=jnp.zeros((), jnp.int32),
                      rng=key, value_head=value_head, reference_params=reference)


def create_train_state(config: ml_collections.ConfigDict, model: nnx.Module,
                       tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, initial TrainState) of a run: policy params, optimizer state, reference, value head.

    The state's arrays stay where the model's params are; place the whole state with
    `jax.device_put(state, train_state_shardings(...))`.
    """
    graphdef, params = split_model(model)
    return graphdef, init_train_state(config, params, tx, int(model.config.hidden_size))


def abstract_train_state(config: ml_collections.ConfigDict, model: nnx.Module,
                         tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState of ShapeDtypeStructs), allocating nothing: for AOT lowering and
    Orbax restore targets. `model` may be `kto_jax.models.transformer.abstract_model(cfg)`."""
    graphdef, params = split_model(model)
    init = functools.partial(init_train_state, config, tx=tx,
                             hidden_size=int(model.config.hidden_size))
    return graphdef, jax.eval_shape(init, params)


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
                      named_shardings(state.reference_params, mesh, rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of every batch array [A, M, ...]: A unsharded, M over the 'batch' rule's axes."""
    return NamedSharding(mesh, PartitionSpec(None, *logical_to_mesh(("batch",), rules)))


# ---------------------------------------------------------------- the math

def microbatch_loss(trainable: tuple[Any, Any], reference: Any, mb: Batch, *,
                    graphdef: nnx.GraphDef, settings: StepSettings) -> tuple[Array, dict]:
    """loss_a * d_a of one microbatch (d_a = its `loss_denominator`, a constant) and its metrics.

    Differentiating this w.r.t. `trainable` = (policy params, value head) and summing
    over microbatches gives the gradient of sum_a loss_sum_a; dividing by sum_a d_a
    makes it the gradient of the whole batch's loss, whatever each microbatch's z0.
    """
    params, value_head = trainable
    loss = settings.loss
    kw = dict(reference_source=settings.reference_source, vocab_chunk=settings.vocab_chunk)
    if loss.paired:
        stats = step_stats.paired_stats(loss, graphdef, params, reference, mb, **kw)
    else:
        stats = step_stats.unpaired_stats(loss, graphdef, params, reference, value_head, mb, **kw)
    value, metrics = loss(stats, settings.hparams)
    return value * jax.lax.stop_gradient(metrics["loss_denominator"]), metrics


def accumulate_gradients(trainable: tuple[Any, Any], reference: Any, batch: Batch, *,
                         graphdef: nnx.GraphDef, settings: StepSettings,
                         grad_shardings: Any = None) -> tuple[Any, Array, dict, Array]:
    """Gradient accumulation: a `lax.scan` over the A microbatches of `batch` [A, M, ...].

    Returns:
      (grads, loss, metrics, tokens): float32 grads of the batch loss
      sum_a loss_sum_a / sum_a d_a, that loss, the loss's metrics summed over
      microbatches, and the matched-token count.
    """
    grad_fn = jax.value_and_grad(
        functools.partial(microbatch_loss, graphdef=graphdef, settings=settings), has_aux=True)
    acc = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    if grad_shardings is not None:
        acc = jax.lax.with_sharding_constraint(acc, grad_shardings)

    def body(acc, mb):
        (scaled, metrics), grads = grad_fn(trainable, reference, mb)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        return acc, (scaled, metrics, step_stats.matched_tokens(mb, settings.loss.paired))

    acc, (scaled, metrics, tokens) = jax.lax.scan(body, acc, dict(batch))
    metrics = jax.tree.map(lambda x: x.sum(0), metrics)
    denominator = jnp.maximum(metrics["loss_denominator"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, acc)
    return grads, scaled.sum() / denominator, metrics, tokens.sum()


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               settings: StepSettings, tx: optax.GradientTransformation,
               schedule: optax.Schedule, grad_shardings: Any = None) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` ([A, M, ...]); pure, so it can be jitted as is."""
    check_batch(batch, settings.loss)
    trainable = (state.params, state.value_head)
    grads, loss, metrics, tokens = accumulate_gradients(
        trainable, state.reference_params, batch, graphdef=graphdef, settings=settings,
        grad_shardings=grad_shardings)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    (params, value_head), opt_state = jax.lax.cond(
        finite, update, lambda: (trainable, state.opt_state))
    skipped = state.skipped_updates + jnp.where(finite, 0, 1).astype(jnp.int32)
    lr = jnp.asarray(schedule(state.step - state.skipped_updates), jnp.float32)
    new_state = state.replace(params=params, value_head=value_head, opt_state=opt_state,
                              step=state.step + 1, skipped_updates=skipped)
    metrics = dict(metrics, tokens=tokens, grad_norm=grad_norm, lr=lr, skipped_updates=skipped)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
              settings: StepSettings) -> dict:
    """The loss's additive metrics on `batch` ([A, M, ...]) summed over microbatches, plus tokens."""
    check_batch(batch, settings.loss)
    trainable = (state.params, state.value_head)

    def body(_, mb):
        _, metrics = microbatch_loss(trainable, state.reference_params, mb, graphdef=graphdef,
                                     settings=settings)
        return None, (metrics, step_stats.matched_tokens(mb, settings.loss.paired))

    _, (metrics, tokens) = jax.lax.scan(body, None, dict(batch))
    return dict(jax.tree.map(lambda x: x.sum(0), metrics), tokens=tokens.sum())


# ---------------------------------------------------------------- jit wiring

def _check_batch_divisible(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    axes = logical_to_mesh(("batch",), config.mesh.rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = 1
    for name in axes:
        shards *= mesh.shape[name]
    if int(config.train.micro_batch_size) % shards:
        raise UserError(f"config.train.micro_batch_size={config.train.micro_batch_size} must be a "
                        f"multiple of the {shards} devices the batch is split over (mesh axes "
                        f"{axes}); change the micro batch size or config.mesh.")


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: TrainState) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step` for config.loss.name, jitted with explicit shardings; `state` is donated.

    Raises UserError at build time for a configuration the loss cannot train with
    (e.g. a microbatch of 1 for a loss that needs z0).
    """
    settings = StepSettings.from_config(config)
    _check_batch_divisible(config, mesh)
    fn = functools.partial(train_step, graphdef=graphdef, settings=settings, tx=tx,
                           schedule=schedule,
                           grad_shardings=(state_shardings.params, state_shardings.value_head))
    fn = activation_sharding(fn, mesh, config.mesh.rules)  # activations follow the logical rules
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding(mesh, config.mesh.rules)),
                   out_shardings=(state_shardings, replicated), donate_argnames="state")


def make_eval_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                   state_shardings: TrainState) -> Callable[[TrainState, Batch], dict]:
    """`eval_step` for config.loss.name, jitted with explicit shardings (nothing donated)."""
    settings = StepSettings.from_config(config)
    _check_batch_divisible(config, mesh)
    fn = activation_sharding(functools.partial(eval_step, graphdef=graphdef, settings=settings),
                             mesh, config.mesh.rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding(mesh, config.mesh.rules)),
                   out_shardings=replicated)
