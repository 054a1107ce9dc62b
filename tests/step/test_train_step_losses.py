"""The train step with the other loss families: paired (DPO), offline PPO with its value
head, precomputed reference log-probs, and a reference-free loss."""

import jax
import numpy as np
import pytest
from flax import nnx
from step_testlib import MODEL, make_batch, make_config, naive_logps, sharper_reference

from kto_jax import step as S
from kto_jax.losses import summarize_metrics
from kto_jax.models.transformer import Transformer
from kto_jax.sharding import make_mesh
from kto_jax.step.optimizer import make_optimizer
from kto_jax.train.settings import step_settings


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def build(cfg, mesh, *, train=True):
    """(graphdef, state, step fn) for `cfg` on `mesh`; the model is the same random init."""
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, state = S.create_train_state(step_settings(cfg), Transformer(MODEL, rngs=nnx.Rngs(0)), tx)
    shardings = S.train_state_shardings(state, tx, mesh, cfg.mesh.rules)
    state = jax.device_put(state, shardings)
    if train:
        return graphdef, state, S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings)
    return graphdef, state, S.make_eval_step(step_settings(cfg), graphdef, mesh, shardings)


@pytest.mark.slow
def test_a_few_dpo_steps_lower_the_loss_and_widen_the_margin(mesh):
    cfg = make_config("dpo", micro=4, accum=2)
    _, state, step = build(cfg, mesh)
    batch = make_batch(10, paired=True, micro=4, accum=2)
    batch["valid"][1, 3] = False
    history = []
    for _ in range(6):
        state, metrics = step(state, batch)
        history.append(summarize_metrics(jax.device_get(metrics)))
    first, last = history[0], history[-1]
    assert first["num_examples"] == 7
    assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-5)  # pi = pi_ref at the start
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert last["loss"] < first["loss"] - 0.02
    assert last["rewards/margins"] > 0.1 and last["rewards/accuracies"] == 1.0


@pytest.mark.slow
def test_offline_ppo_trains_the_value_head_and_never_the_reference(mesh):
    cfg = make_config("ppo_offline", micro=4, accum=1)
    _, state, step = build(cfg, mesh)
    ref0 = jax.tree.map(np.asarray, state.reference_params)
    params0 = jax.tree.map(np.asarray, state.params)
    batch = make_batch(11, micro=4, accum=1)
    for _ in range(2):
        state, metrics = step(state, batch)
    summary = summarize_metrics(jax.device_get(metrics))
    assert all(np.isfinite(v) for v in summary.values()), summary
    assert summary["loss_denominator"] == batch["completion_mask"].sum()  # token mean
    # the last layer starts at 0; after two updates the head predicts non-zero values
    assert np.abs(np.asarray(state.value_head["dense_2"]["kernel"])).max() > 0
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(state.params), jax.tree.leaves(params0)))
    for a, b in zip(jax.tree.leaves(state.reference_params), jax.tree.leaves(ref0)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_precomputed_reference_logps_give_the_model_reference_metrics(mesh):
    """KTO with pi_ref's log-probs carried in the batch (matched and KL pairs, rolled by one
    within each microbatch) gives the metrics of KTO with the frozen reference model."""
    cfg = make_config("kto", micro=4, accum=2)
    graphdef, state, eval_model = build(cfg, mesh, train=False)
    state = state.replace(reference_params=sharper_reference(state.params))
    batch = make_batch(12, micro=4, accum=2)
    ref = state.reference_params
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    ref_logps, ref_kl = [], []
    for a in range(2):
        x, xm, y, ym = (batch[k][a] for k in keys)
        ref_logps.append(naive_logps(graphdef, ref, x, xm, y, ym))
        ref_kl.append(naive_logps(graphdef, ref, x, xm, np.roll(y, -1, 0), np.roll(ym, -1, 0)))
    pre_cfg = make_config("kto", micro=4, accum=2)
    pre_cfg.reference.source = "precomputed"
    _, pre_state, eval_pre = build(pre_cfg, mesh, train=False)
    assert pre_state.reference_params is None
    pre_batch = dict(batch, reference_logps=np.stack(ref_logps), reference_kl_logps=np.stack(ref_kl))
    want = jax.device_get(eval_model(state, batch))
    got = jax.device_get(eval_pre(pre_state, pre_batch))
    assert want["kl_sum"] > 0.1  # a reference that differs from the policy: z0 > 0
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_reference_free_kto_runs_without_reference_params(mesh):
    cfg = make_config("kto_reference_free", micro=4, accum=1)
    cfg.reference.source = "none"
    _, state, step = build(cfg, mesh)
    assert state.reference_params is None
    state, metrics = step(state, make_batch(13, micro=4, accum=1))
    summary = summarize_metrics(jax.device_get(metrics))
    assert all(np.isfinite(v) for v in summary.values()) and int(state.skipped_updates) == 0
