"""The train step: one pure function `(state, batch) -> (state, metrics)`, jitted and sharded.

API (what the trainer and the AOT compiler call):

    settings = read_settings(config).step                # kto_jax/train/settings.py, once
    tx, schedule = make_optimizer(optim, num_steps)      # kto_jax.step.optimizer
    state, shardings = init_sharded_state(settings, tx, mesh, hidden_size, make_params, ...)
    train_step = make_train_step(settings, graphdef, tx, schedule, mesh, shardings)
    state, metrics = train_step(state, batch)          # `state` is donated
    eval_step = make_eval_step(settings, graphdef, mesh, shardings)
    metrics = eval_step(state, batch)
    summarize_metrics(jax.device_get(metrics))         # kto_jax.losses; host side

The state (TrainState, its shardings, `abstract_train_state` for AOT lowering) is
kto_jax/step/state.py; `batch_sharding(mesh, rules)` gives the batch's sharding, and
every batch array is [A, M, ...] (kto_jax/batch.py; a packed batch's rows [A, R, T], packed
per batch shard: the jitted builders give the step `settings.pack_groups` from the mesh). `make_reference_step` jits the
reference forward alone over a batch: what `kto-jax precompute-ref` stores.

Inside the step (docs/design.md, "The data path"): a `lax.scan` over the A microbatches; per
microbatch the stats of kto_jax/step/stats.py (KL batch rolled within the
microbatch, its own z0) and the loss's gradient, weighted by the loss's true
denominator (`loss_denominator`: examples, or tokens for token-mean losses), so the
accumulated gradient is that of sum_a loss_sum_a / sum_a denominator_a. Under LoRA
(kto_jax/step/adapters.py) `state.params` are the adapters, the graphdef a LoraGraph, and
the policy, its KL forward and the reference all read the one frozen `state.base_params`
(the reference with the adapters off, or with the frozen starting adapter). The policy and
the value head share one optimizer, so global-norm clipping sees both (the value head's
gradient never reaches the policy: it reads detached hidden states). A non-finite loss
or gradient leaves params and optimizer state unchanged and counts a skip; `step`
still advances, the schedule (indexed by applied updates) does not.

A loss with its own state (`HaloLoss.loss_state`: bco's running reward mean) reads
`state.loss_state` in its stats; the scan carries it from microbatch to microbatch
(updated by `HaloLoss.update_loss_state`), the step stores the result (unless the step
is skipped) and the eval step reads it without updating. With reference syncing
(`StepSettings.reference_sync`, TR-DPO) the step also blends the policy it used into
`state.reference_params` every tau steps (`synced_reference`).

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
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kto_jax.batch import BatchSize, has_kl_stream, is_packed, step_keys
from kto_jax.errors import UserError
from kto_jax.losses.registry import HaloLoss
from kto_jax.sharding import activation_sharding, batch_axes, batch_shards
from kto_jax.step import adapters
from kto_jax.step import stats as step_stats
from kto_jax.step.settings import StepSettings
from kto_jax.step.state import TrainState, batch_sharding

Array = jax.Array
Batch = Mapping[str, Array]


def check_batch(batch: Batch, loss: HaloLoss) -> None:
    """UserError (at trace time) for a batch whose layout or microbatch size the loss cannot use."""
    packed = is_packed(batch)
    missing = [k for k in step_keys(loss.paired, packed, has_kl_stream(batch)) if k not in batch]
    if missing:
        layout = "paired (chosen/rejected)" if loss.paired else "unpaired (completion + label)"
        raise UserError(f"loss {loss.name!r} trains on {layout} batches"
                        f"{' (packed)' if packed else ''}, but the batch lacks {missing}: use "
                        "data of that kind (config.data.format) or another config.loss.name.")
    a, m = batch["valid"].shape[:2]
    BatchSize(a * m, m).check(z0_loss=loss.name if loss.uses_kl else None)


# ---------------------------------------------------------------- the math

def microbatch_loss(trainable: tuple[Any, Any], reference: Any, mb: Batch, *,
                    graphdef: nnx.GraphDef, settings: StepSettings, loss_state: Any = None,
                    frozen_loss_state: bool = False) -> tuple[Array, dict]:
    """loss_a * d_a of one microbatch (d_a = its `loss_denominator`, a constant) and its metrics.

    Differentiating this w.r.t. `trainable` = (policy params, value head) and summing
    over microbatches gives the gradient of sum_a loss_sum_a; dividing by sum_a d_a
    makes it the gradient of the whole batch's loss, whatever each microbatch's z0.
    `loss_state` (the loss's own state before this microbatch, e.g. bco's running mean)
    goes into the stats; `frozen_loss_state` tells the loss it will not be updated (eval).
    """
    params, value_head = trainable
    params, reference = adapters.policy_and_reference(params, reference)  # LoRA: base + adapters
    loss = settings.loss
    kw = dict(reference_source=settings.reference_source, vocab_chunk=settings.vocab_chunk,
              groups=settings.pack_groups)
    if loss.paired:
        stats = step_stats.paired_stats(loss, graphdef, params, reference, mb, **kw)
    else:
        stats = step_stats.unpaired_stats(loss, graphdef, params, reference, value_head, mb, **kw)
    router = stats.pop(step_stats.ROUTER_KEY, None)
    if loss_state is not None:
        stats.update(loss_state, frozen_loss_state=frozen_loss_state)
    value, metrics = loss(stats, settings.hparams)
    denominator = jax.lax.stop_gradient(metrics["loss_denominator"])
    if router is not None:  # a mixture of experts: + coef * load-balancing loss, logged apart
        value = value + router[1]
        metrics = {**metrics, "router_aux_loss_sum": jax.lax.stop_gradient(router[0]) * denominator}
    return value * denominator, metrics


def accumulate_gradients(trainable: tuple[Any, Any], reference: Any, batch: Batch, *,
                         graphdef: nnx.GraphDef, settings: StepSettings,
                         grad_shardings: Any = None, dropout_keys: Array | None = None,
                         loss_state: Any = None) -> tuple[Any, Array, dict, Array, Any]:
    """Gradient accumulation: a `lax.scan` over the A microbatches of `batch` [A, M, ...].

    `reference` is `adapters.frozen_inputs` (the frozen reference, or under LoRA the base
    view); `dropout_keys` [A, 2], one LoRA dropout key per microbatch, or None;
    `loss_state` the loss's state (`HaloLoss.loss_state`) before the first microbatch,
    carried through the scan: microbatch a + 1 sees it after microbatch a's update.

    Returns:
      (grads, loss, metrics, tokens, loss_state): float32 grads of the batch loss
      sum_a loss_sum_a / sum_a d_a, that loss, the loss's metrics summed over
      microbatches, the matched-token count, and the loss state after the last microbatch.
    """
    grad_fn = jax.value_and_grad(
        functools.partial(microbatch_loss, graphdef=graphdef, settings=settings), has_aux=True)
    acc = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    if grad_shardings is not None:
        acc = jax.lax.with_sharding_constraint(acc, grad_shardings)
    update_state = settings.loss.update_loss_state

    def body(carry, xs):
        acc, state = carry
        mb, key = xs
        (scaled, metrics), grads = grad_fn(trainable, adapters.with_dropout_key(reference, key), mb,
                                           loss_state=state)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        if state is not None:
            state = update_state(state, metrics)
        return (acc, state), (scaled, metrics, step_stats.matched_tokens(mb, settings.loss.paired))

    (acc, loss_state), (scaled, metrics, tokens) = jax.lax.scan(
        body, (acc, loss_state), (dict(batch), dropout_keys))
    metrics = jax.tree.map(lambda x: x.sum(0), metrics)
    denominator = jnp.maximum(metrics["loss_denominator"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, acc)
    return grads, scaled.sum() / denominator, metrics, tokens.sum(), loss_state


def synced_reference(state: TrainState, settings: StepSettings) -> Any:
    """`state.reference_params` after step `state.step + 1` (TR-DPO, docs/losses.md): on every
    tau-th step pi_ref <- alpha pi_theta + (1 - alpha) pi_ref, pi_theta being the policy this
    step's forward used (before its update, as HALOs syncs), blended in float32 and stored
    in the reference's dtype; unchanged otherwise, or without `settings.reference_sync`."""
    if settings.reference_sync is None or state.reference_params is None:
        return state.reference_params
    every, alpha = settings.reference_sync

    def blend():
        return jax.tree.map(
            lambda p, r: (alpha * p.astype(jnp.float32)
                          + (1.0 - alpha) * r.astype(jnp.float32)).astype(r.dtype),
            state.params, state.reference_params)

    return jax.lax.cond((state.step + 1) % every == 0, blend, lambda: state.reference_params)


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               settings: StepSettings, tx: optax.GradientTransformation,
               schedule: optax.Schedule, grad_shardings: Any = None) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` ([A, M, ...]); pure, so it can be jitted as is."""
    check_batch(batch, settings.loss)
    trainable = (state.params, state.value_head)
    keys = adapters.microbatch_dropout_keys(graphdef, state.rng, state.step,
                                            batch["valid"].shape[0])
    grads, loss, metrics, tokens, loss_state = accumulate_gradients(
        trainable, adapters.frozen_inputs(graphdef, state), batch, graphdef=graphdef,
        settings=settings, grad_shardings=grad_shardings, dropout_keys=keys,
        loss_state=state.loss_state)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    (params, value_head), opt_state = jax.lax.cond(
        finite, update, lambda: (trainable, state.opt_state))
    skipped = state.skipped_updates + jnp.where(finite, 0, 1).astype(jnp.int32)
    lr = jnp.asarray(schedule(state.step - state.skipped_updates), jnp.float32)
    # a skipped (non-finite) step leaves the loss state as it was, like the params
    loss_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), loss_state,
                              state.loss_state)
    new_state = state.replace(params=params, value_head=value_head, opt_state=opt_state,
                              step=state.step + 1, skipped_updates=skipped, loss_state=loss_state,
                              reference_params=synced_reference(state, settings))
    metrics = dict(metrics, tokens=tokens, grad_norm=grad_norm, lr=lr, skipped_updates=skipped)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
              settings: StepSettings) -> dict:
    """The loss's additive metrics on `batch` ([A, M, ...]) summed over microbatches, plus tokens."""
    check_batch(batch, settings.loss)
    trainable = (state.params, state.value_head)

    def body(_, mb):
        _, metrics = microbatch_loss(trainable, adapters.frozen_inputs(graphdef, state), mb,
                                     graphdef=graphdef, settings=settings,
                                     loss_state=state.loss_state, frozen_loss_state=True)
        return None, (metrics, step_stats.matched_tokens(mb, settings.loss.paired))

    _, (metrics, tokens) = jax.lax.scan(body, None, dict(batch))
    return dict(jax.tree.map(lambda x: x.sum(0), metrics), tokens=tokens.sum())


def reference_step(reference: Any, batch: Batch, *, loss: HaloLoss | step_stats.Forwards,
                   graphdef: nnx.GraphDef, vocab_chunk: int, pack_groups: int = 1
                   ) -> dict[str, Array]:
    """float32 [A, M] per key of `stats.reference_keys(loss)` for a batch [A, M, ...]: the step's
    own reference forward (`stats.reference_logps`), a `lax.scan` over its microbatches.
    Packed batches give the same per-example arrays (`pack_groups`: their packing groups)."""
    inputs = {k: batch[k] for k in step_keys(loss.paired, is_packed(batch), has_kl_stream(batch))}

    def body(_, mb):
        return None, step_stats.reference_logps(loss, graphdef, reference, mb, vocab_chunk,
                                                groups=pack_groups)

    return jax.lax.scan(body, None, inputs)[1]


# ---------------------------------------------------------------- jit wiring

def on_mesh(settings: StepSettings, mesh: Mesh) -> StepSettings:
    """`settings` for `mesh`: its batch sizes checked against the devices the batch is split
    over, and the packing groups of that mesh (the data pipeline packs each batch shard's
    examples into rows of their own, kto_jax/data/packing.py, one group per shard)."""
    shards = batch_shards(mesh, settings.rules)
    if settings.batch is not None:
        settings.batch.check(shards=shards, shard_axes=batch_axes(settings.rules))
    return dataclasses.replace(settings, pack_groups=shards)


def make_train_step(settings: StepSettings, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: TrainState
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step` of `settings` (the runtime's, kto_jax/train/settings.py), jitted with
    explicit shardings; `state` is donated.

    Raises UserError at build time for a batch the mesh cannot split (`on_mesh`).
    """
    settings = on_mesh(settings, mesh)
    fn = functools.partial(train_step, graphdef=graphdef, settings=settings, tx=tx,
                           schedule=schedule,
                           grad_shardings=(state_shardings.params, state_shardings.value_head))
    fn = activation_sharding(fn, mesh, settings.rules)  # activations follow the logical rules
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding(mesh, settings.rules)),
                   out_shardings=(state_shardings, replicated), donate_argnames="state")


def make_eval_step(settings: StepSettings, graphdef: nnx.GraphDef, mesh: Mesh,
                   state_shardings: TrainState) -> Callable[[TrainState, Batch], dict]:
    """`eval_step` of `settings`, jitted with explicit shardings (nothing donated)."""
    settings = on_mesh(settings, mesh)
    fn = activation_sharding(functools.partial(eval_step, graphdef=graphdef, settings=settings),
                             mesh, settings.rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding(mesh, settings.rules)),
                   out_shardings=replicated)


def make_reference_step(loss: HaloLoss | step_stats.Forwards, graphdef: nnx.GraphDef,
                        vocab_chunk: int, mesh: Mesh, reference_shardings: Any, rules: Any = None
                        ) -> Callable[[Any, Batch], dict[str, Array]]:
    """`reference_step` as `fn(reference_params, batch) -> {key: [A, M]}`, jitted; the batch on
    `batch_sharding(mesh, rules)`, outputs replicated on every device. With `rules`
    (config.mesh.rules) the model's activations follow them (kto_jax.sharding.constrain).
    `loss` is what to compute: a HaloLoss, or `stats.MATCHED_ONLY` (log pi(y|x) alone).
    """
    fn = functools.partial(reference_step, loss=loss, graphdef=graphdef, vocab_chunk=vocab_chunk,
                           pack_groups=batch_shards(mesh, rules))
    if rules is not None:
        fn = activation_sharding(fn, mesh, rules)
    return jax.jit(fn, in_shardings=(reference_shardings, batch_sharding(mesh, rules)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
