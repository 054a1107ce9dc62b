"""The jitted KTO train step on a tiny random Transformer, checked against hand-built math.

The hand path uses the model's full float32 logits (`model(...)`), a per-microbatch
KL pairing (`kto_jax.batch.kl_partners`: the next real row), `kto_jax.losses.kto_loss` per microbatch and the count-weighted sum of
microbatch losses; the step uses the vocab-chunked log-probs, its own KL batch and
`lax.scan` accumulation. One step program is compiled for the whole module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from step_testlib import (A, M, MODEL, fresh, make_batch, make_config, naive_logps,
                          sharper_reference)

from kto_jax import step as S
from kto_jax.batch import kl_pair_valid, kl_partners
from kto_jax.errors import UserError
from kto_jax.losses import get_loss, kto_loss, summarize_metrics
from kto_jax.models.transformer import Transformer, abstract_model
from kto_jax.sharding import make_mesh
from kto_jax.step import stats as step_stats
from kto_jax.step.optimizer import make_optimizer
from kto_jax.train.settings import step_settings


def hand_kto(graphdef, params, reference, batch, hp):
    """Batch loss sum_a n_a loss_a / sum_a n_a with per-microbatch KL pairs and z0, the KL and
    reference log-probs computed OUTSIDE the differentiated function (constants).
    Returns (grads, loss, z0 per microbatch)."""
    consts = []
    for a in range(batch["valid"].shape[0]):
        mb = {k: jnp.asarray(v[a]) for k, v in batch.items()}
        x, xm, y, ym = mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"], mb["completion_mask"]
        partners = kl_partners(np.asarray(mb["valid"]))  # the next real row, cyclically
        y_kl, ym_kl = y[partners], ym[partners]
        consts.append(dict(mb=mb, ref=naive_logps(graphdef, reference, x, xm, y, ym),
                           pol_kl=naive_logps(graphdef, params, x, xm, y_kl, ym_kl),
                           ref_kl=naive_logps(graphdef, reference, x, xm, y_kl, ym_kl)))

    def total(p):
        losses, counts = [], []
        for c in consts:
            mb = c["mb"]
            pol = naive_logps(graphdef, p, mb["prompt_ids"], mb["prompt_mask"],
                              mb["completion_ids"], mb["completion_mask"])
            valid = mb["valid"]
            loss, metrics = kto_loss(pol, c["ref"], c["pol_kl"], c["ref_kl"], mb["desirable"],
                                     beta=hp.beta, mask=valid, weight=mb["weight"],
                                     kl_mask=kl_pair_valid(valid, jnp))
            losses.append(loss)
            counts.append(metrics["num_examples"])
        return sum(l * n for l, n in zip(losses, counts)) / sum(counts)

    loss, grads = jax.jit(jax.value_and_grad(total))(params)
    z0 = []
    for c in consts:
        kl_mask = kl_pair_valid(np.asarray(c["mb"]["valid"]))
        z0.append(max(0.0, float(np.mean(np.asarray(c["pol_kl"] - c["ref_kl"])[kl_mask]))))
    return grads, loss, z0


@pytest.fixture(scope="module")
def setup():
    cfg = make_config()
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, state = S.create_train_state(step_settings(cfg), model, tx)
    state = state.replace(reference_params=sharper_reference(state.params))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shardings = S.train_state_shardings(state, tx, mesh, cfg.mesh.rules)
    state = jax.device_put(state, shardings)
    step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings)
    return dict(cfg=cfg, tx=tx, schedule=schedule, graphdef=graphdef, state=state, step=step,
                mesh=mesh)


@pytest.mark.slow
def test_step_equals_count_weighted_per_microbatch_hand_computation(setup):
    """Accumulation over A=2 microbatches of unequal size (one filler row) with per-microbatch
    KL pairs and z0 gives exactly the gradient of sum_a n_a loss_a / sum_a n_a, and the update
    optax makes from it. Rolling across microbatches or averaging the microbatch averages would
    change z0 / the weights and fail here."""
    batch = make_batch(1)
    batch["valid"][1, 5] = False
    state0 = setup["state"]
    grads, loss, z0 = hand_kto(setup["graphdef"], state0.params, state0.reference_params, batch,
                               setup["cfg"].loss)
    assert min(z0) > 0.01 and abs(z0[0] - z0[1]) > 1e-3  # z0 matters and differs per microbatch
    new_state, metrics = setup["step"](fresh(state0), batch)
    m = jax.device_get(metrics)
    assert m["num_examples"] == 15 and m["loss_denominator"] == 15
    np.testing.assert_allclose(m["loss_sum"] / 15, loss, rtol=1e-5)
    np.testing.assert_allclose(m["kl_sum"], 8 * z0[0] + 7 * z0[1], rtol=1e-4)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
    updates, _ = setup["tx"].update((grads, None), state0.opt_state, (state0.params, None))
    want = optax.apply_updates(state0.params, updates[0])
    for got_leaf, want_leaf in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-6)
    assert int(new_state.step) == 1 and int(new_state.skipped_updates) == 0


@pytest.mark.slow
def test_kl_pairs_roll_within_each_microbatch_for_policy_and_reference(setup):
    """The step's z0 per microbatch matches the within-microbatch roll, not a full-batch roll."""
    batch = make_batch(2)
    state = setup["state"]
    g = setup["graphdef"]
    _, metrics = setup["step"](fresh(state), batch)
    flat = {k: jnp.asarray(v.reshape((A * M,) + v.shape[2:])) for k, v in batch.items()}

    def z0_of(x, xm, y, ym):
        y_kl, ym_kl = jnp.roll(y, -1, 0), jnp.roll(ym, -1, 0)
        diff = (naive_logps(g, state.params, x, xm, y_kl, ym_kl)
                - naive_logps(g, state.reference_params, x, xm, y_kl, ym_kl))
        return jnp.maximum(diff.reshape(-1, M).mean(-1), 0.0)  # per microbatch

    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    within = jnp.concatenate([z0_of(*[jnp.asarray(batch[k][a]) for k in keys]) for a in range(A)])
    across = z0_of(*[flat[k] for k in keys])  # what a full-batch roll would give
    np.testing.assert_allclose(metrics["kl_sum"], M * within.sum(), rtol=1e-4)
    assert abs(float(M * across.sum()) - float(metrics["kl_sum"])) > 1e-3


def test_no_gradient_through_kl_and_reference_forwards(setup):
    """The KL forward sees the policy params as constants (stop_gradient before the forward):
    its log-probs have an identically zero gradient w.r.t. the params, as do the reference's."""
    mb = {k: jnp.asarray(v[0]) for k, v in make_batch(3).items()}
    state, g = setup["state"], setup["graphdef"]
    loss = get_loss("kto")

    keys = ("policy_kl_logps", "reference_kl_logps", "reference_logps", "policy_logps")

    def stat_sums(p):
        stats = step_stats.unpaired_stats(loss, g, p, state.reference_params, None, mb,
                                          reference_source="model", vocab_chunk=48)
        return jnp.stack([stats[k].sum() for k in keys])

    jac = jax.jit(jax.jacrev(stat_sums))(state.params)  # leaves [4, *param_shape]
    largest = np.max([np.abs(np.asarray(x)).reshape(4, -1).max(-1) for x in jax.tree.leaves(jac)], 0)
    np.testing.assert_array_equal(largest[:3], 0.0)  # KL (policy and reference) and reference
    assert largest[3] > 0  # the matched policy forward does carry the gradient


def test_all_desirable_batch_gives_finite_metrics(setup):
    batch = make_batch(4)
    batch["desirable"][:] = True
    new_state, metrics = setup["step"](fresh(setup["state"]), batch)
    summary = summarize_metrics(jax.device_get(metrics))
    assert summary["count/undesirable"] == 0 and summary["count/desirable"] == A * M
    assert all(np.isfinite(v) for v in summary.values()), summary
    assert int(new_state.skipped_updates) == 0


def test_non_finite_loss_skips_the_update(setup):
    batch = make_batch(5)
    batch["weight"][1, 3] = np.nan
    state0 = setup["state"]
    new_state, metrics = setup["step"](fresh(state0), batch)
    assert int(new_state.skipped_updates) == 1 and int(metrics["skipped_updates"]) == 1
    assert int(new_state.step) == 1
    for got, want in zip(jax.tree.leaves((new_state.params, new_state.opt_state)),
                         jax.tree.leaves((state0.params, state0.opt_state))):
        np.testing.assert_array_equal(got, want)
    # the next finite batch updates again, and the schedule did not advance on the skip
    newer, metrics = setup["step"](new_state, make_batch(6))
    assert int(newer.skipped_updates) == 1 and int(newer.step) == 2
    assert float(metrics["lr"]) == pytest.approx(1e-2)
    assert not np.array_equal(jax.tree.leaves(newer.params)[0], jax.tree.leaves(state0.params)[0])


def test_a_few_kto_steps_lower_the_loss_and_widen_the_reward_margin(setup):
    batch = make_batch(7)
    state = fresh(setup["state"])
    history = []
    for _ in range(8):
        state, metrics = setup["step"](state, batch)
        history.append(summarize_metrics(jax.device_get(metrics)))
    assert history[-1]["loss"] < history[0]["loss"] - 0.01
    margins = [h["rewards/desirable"] - h["rewards/undesirable"] for h in history]
    assert margins[-1] > margins[0] + 0.1
    ref_leaves = jax.tree.leaves(setup["state"].reference_params)
    np.testing.assert_array_equal(jax.tree.leaves(state.reference_params)[0], ref_leaves[0])


def test_microbatch_of_one_is_rejected_at_build_time(setup):
    cfg = make_config(micro=1, accum=8)
    with pytest.raises(UserError, match="micro_batch_size=1.*at least 2"):
        S.make_train_step(step_settings(cfg), setup["graphdef"], setup["tx"],
                          optax.constant_schedule(0.0), setup["mesh"], None)


def test_microbatch_not_divisible_by_the_batch_devices_is_rejected(setup):
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    with pytest.raises(UserError, match="multiple of the 8 devices"):
        S.make_train_step(step_settings(make_config(micro=4)), setup["graphdef"], setup["tx"],
                          optax.constant_schedule(0.0), mesh, None)


def test_reference_source_mismatches_are_user_errors():
    cfg = make_config()
    cfg.reference.source = "none"
    with pytest.raises(UserError, match="needs a reference"):
        step_settings(cfg)
    cfg = make_config(loss="ppo_offline")
    cfg.reference.source = "precomputed"
    with pytest.raises(UserError, match="per-token reference"):
        step_settings(cfg)


@pytest.mark.slow
def test_step_on_an_8_device_mesh_matches_one_device(setup):
    """data=4 x fsdp=2: the batch split over 8 devices, params over fsdp; z0 is still the mean
    over the whole microbatch, so metrics (kl_sum = sum_a z0_a n_a) and the update match."""
    cfg, tx, g = setup["cfg"], setup["tx"], setup["graphdef"]
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    shardings = S.train_state_shardings(setup["state"], tx, mesh, cfg.mesh.rules)
    assert shardings.params["lm_head"].get_value().spec[0] == "fsdp"
    step8 = S.make_train_step(step_settings(cfg), g, tx, setup["schedule"], mesh, shardings)
    batch = make_batch(8)
    one_state, one = setup["step"](fresh(setup["state"]), batch)
    eight_state, eight = step8(jax.device_put(fresh(setup["state"]), shardings), batch)
    assert eight_state.params["lm_head"].get_value().sharding.spec[0] == "fsdp"
    assert float(one["kl_sum"]) > 0.1
    for key in one:
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(eight_state.params), jax.tree.leaves(one_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_abstract_state_lowers_on_a_mesh_with_the_state_donated():
    """What the AOT compiler does: an abstract state (nothing allocated; the reference in the
    default bfloat16), abstract sharded inputs, `lower`. Every state buffer is donated."""
    cfg = make_config()
    cfg.reference.param_dtype = "bfloat16"
    tx, schedule = make_optimizer(cfg.optim, 10)
    graphdef, state = S.abstract_train_state(step_settings(cfg), abstract_model(MODEL), tx)
    assert {x.dtype for x in jax.tree.leaves(state.reference_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    shardings = S.train_state_shardings(state, tx, mesh, cfg.mesh.rules)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings)

    def abstract(batch):
        sharding = S.batch_sharding(mesh, cfg.mesh.rules)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}

    lowered = step.lower(state, abstract(make_batch(0)))
    state_info, batch_info = lowered.args_info[0]
    assert all(i.donated for i in jax.tree.leaves(state_info))
    assert not any(i.donated for i in jax.tree.leaves(batch_info))
    with pytest.raises(UserError, match="unpaired .* lacks"):
        step.lower(state, abstract(make_batch(0, paired=True)))
