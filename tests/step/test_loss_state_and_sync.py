"""The train step's loss state (bco's running reward mean), reference syncing (TR-DPO) and
the z0 edges of the KL pairs (filler rows, one real row), against hand-built math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from step_testlib import MODEL, fresh, make_batch, make_config, naive_logps, sharper_reference

from kto_jax import step as S
from kto_jax.batch import kl_pair_valid, kl_partners
from kto_jax.errors import UserError
from kto_jax.losses import summarize_metrics
from kto_jax.models.transformer import Transformer
from kto_jax.sharding import make_mesh
from kto_jax.step import stats as step_stats
from kto_jax.step.optimizer import make_optimizer
from kto_jax.train.settings import step_settings


def one_device():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def build(cfg):
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, state = S.create_train_state(step_settings(cfg), Transformer(MODEL, rngs=nnx.Rngs(0)), tx)
    if state.reference_params is not None:
        state = state.replace(reference_params=sharper_reference(state.params))
    mesh = one_device()
    shardings = S.train_state_shardings(state, tx, mesh, cfg.mesh.rules)
    step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings)
    evaluate = S.make_eval_step(step_settings(cfg), graphdef, mesh, shardings)
    return graphdef, jax.device_put(state, shardings), step, evaluate


def rewards(graphdef, state, batch, beta):
    """beta (log pi - log pi_ref) [A, M] of the matched pairs, by the naive forward."""
    args = [jnp.asarray(batch[k]) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                            "completion_mask")]
    out = []
    for a in range(batch["valid"].shape[0]):
        mb = [x[a] for x in args]
        out.append(beta * (naive_logps(graphdef, state.params, *mb)
                           - naive_logps(graphdef, state.reference_params, *mb)))
    return np.asarray(jnp.stack(out), np.float64)


@pytest.mark.slow
def test_bco_running_mean_is_carried_across_microbatches_and_steps():
    """Step 1 (2 microbatches, a filler row in the second): microbatch a trains against
    delta_a = the mean of every reward so far INCLUDING its own; the state after the step
    is the mean and count of all real rewards. Step 2 continues from it; eval reads it
    without moving it."""
    cfg = make_config("bco", beta=0.5)
    graphdef, state, step, evaluate = build(cfg)
    batch = make_batch(31)
    batch["valid"][1, -1] = False
    batch["weight"][1, -1] = 0.0
    r1 = rewards(graphdef, state, batch, 0.5)
    real = [r1[a][batch["valid"][a]] for a in range(2)]
    delta = [real[0].mean(), np.concatenate(real).mean()]
    state, metrics = step(fresh(state), batch)
    n = [len(x) for x in real]
    assert float(metrics["bco/delta_sum"]) == pytest.approx(delta[0] * n[0] + delta[1] * n[1], rel=1e-5)
    assert int(state.loss_state["bco_count"]) == 15
    assert float(state.loss_state["bco_delta"]) == pytest.approx(delta[1], rel=1e-5)
    # eval: delta = the state's mean for every microbatch, state unchanged
    evaluated = evaluate(state, batch)
    assert float(evaluated["bco/delta_sum"]) == pytest.approx(delta[1] * 15, rel=1e-5)
    batch2 = make_batch(32)
    r2 = rewards(graphdef, state, batch2, 0.5)
    state2, metrics2 = step(fresh(state), batch2)
    assert int(state2.loss_state["bco_count"]) == 31
    want = (delta[1] * 15 + r2.sum()) / 31
    assert float(state2.loss_state["bco_delta"]) == pytest.approx(want, rel=1e-5)
    assert np.isfinite(summarize_metrics(jax.device_get(metrics2))["loss"])


@pytest.mark.slow
def test_reference_sync_blends_the_policy_every_tau_steps():
    """sync_every=2, alpha=0.25: step 1 leaves pi_ref; step 2 sets pi_ref <- 0.25 pi_theta +
    0.75 pi_ref with pi_theta the policy step 2's forward used (the params after step 1)."""
    cfg = make_config("kto")
    cfg.reference.sync_every, cfg.reference.sync_alpha = 2, 0.25
    graphdef, state, step, _ = build(cfg)
    ref0 = jax.device_get(state.reference_params)
    state1, _ = step(fresh(state), make_batch(33))
    for got, want in zip(jax.tree.leaves(jax.device_get(state1.reference_params)), jax.tree.leaves(ref0)):
        np.testing.assert_array_equal(got, want)
    params1 = jax.device_get(state1.params)
    state2, _ = step(fresh(state1), make_batch(34))
    for got, p, r in zip(jax.tree.leaves(jax.device_get(state2.reference_params)),
                         jax.tree.leaves(params1), jax.tree.leaves(ref0)):
        np.testing.assert_allclose(got, 0.25 * p + 0.75 * r, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_humanline_syncs_every_step_by_default():
    cfg = make_config("humanline")
    assert step_settings(cfg).reference_sync == (1, 1.0)
    graphdef, state, step, _ = build(cfg)
    params0 = jax.device_get(state.params)
    state1, metrics = step(fresh(state), make_batch(35))
    assert 0.0 < summarize_metrics(jax.device_get(metrics))["humanline/unclamped"] <= 1.0
    for got, want in zip(jax.tree.leaves(jax.device_get(state1.reference_params)), jax.tree.leaves(params0)):
        np.testing.assert_array_equal(got, want)  # pi_ref = the policy step 1 used


def test_reference_sync_config_errors():
    cfg = make_config("kto")
    cfg.reference.sync_every = 4
    cfg.reference.source = "precomputed"
    with pytest.raises(UserError, match="sync_every=4.*stored reference log-probs cannot follow"):
        step_settings(cfg)
    cfg = make_config("kto")
    cfg.reference.sync_every, cfg.lora.rank = 4, 8
    with pytest.raises(UserError, match="LoRA.*lora.rank=0"):
        step_settings(cfg)
    cfg = make_config("humanline")
    cfg.lora.rank = 8
    with pytest.raises(UserError, match="loss 'humanline' \\(which syncs its reference every 1"):
        step_settings(cfg)
    cfg = make_config("orpo")
    cfg.reference.sync_every = 2
    with pytest.raises(UserError, match="no reference model to sync"):
        step_settings(cfg)
    cfg = make_config("kto")
    cfg.reference.sync_every, cfg.reference.sync_alpha = 2, 1.5
    with pytest.raises(UserError, match="sync_alpha=1.5 must lie in \\(0, 1\\]"):
        step_settings(cfg)


def test_kl_pairs_wrap_around_the_real_rows():
    valid = np.array([True, True, True, False, False])
    np.testing.assert_array_equal(kl_partners(valid), [1, 2, 0, 0, 0])
    np.testing.assert_array_equal(kl_pair_valid(valid), [True, True, True, False, False])
    np.testing.assert_array_equal(kl_partners(np.ones(4, bool)), [1, 2, 3, 0])  # = roll(-1)
    assert not kl_pair_valid(np.array([False, True, False])).any()                # one real row
    ids = jnp.arange(5)[:, None] * jnp.ones((1, 3), jnp.int32)
    y_kl, _ = step_stats.kl_completions(ids, jnp.ones((5, 3), jnp.int32), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(y_kl)[:, 0], [1, 2, 0, 0, 0])


@pytest.mark.slow
def test_z0_over_the_real_rows_and_a_single_row_microbatch_is_counted():
    """Microbatch 0: 3 real rows then filler -> z0 from pairs (0,1), (1,2), (2,0) by hand;
    microbatch 1: one real row -> z0 = 0 and count/kl_unpaired_microbatches = 1."""
    cfg = make_config("kto", micro=4)
    graphdef, state, step, _ = build(cfg)
    batch = make_batch(36, micro=4)
    batch["valid"][0] = [True, True, True, False]
    batch["valid"][1] = [True, False, False, False]
    batch["weight"][~batch["valid"]] = 0.0
    x, xm, y, ym = (jnp.asarray(batch[k][0]) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                       "completion_mask"))
    order = jnp.asarray([1, 2, 0])
    kl = (naive_logps(graphdef, state.params, x[:3], xm[:3], y[order], ym[order])
          - naive_logps(graphdef, state.reference_params, x[:3], xm[:3], y[order], ym[order]))
    z0 = max(float(jnp.mean(kl)), 0.0)
    assert z0 > 0.01
    _, metrics = step(fresh(state), batch)
    assert float(metrics["kl_sum"]) == pytest.approx(z0 * 3, rel=1e-4)   # microbatch 1 adds 0 * 1
    assert float(metrics["count/kl_unpaired_microbatches"]) == 1.0
