"""LoRA in the train step (issue 12): the base is frozen and shared by policy and reference,
only the adapters are trained.

- at step 0 (B = 0) the policy equals the reference exactly: log-ratios, KL and rewards 0;
- the LoRA gradient of the KTO loss is the projection of the full-parameter gradient at the
  merged weights: dL/dA = s G B^T, dL/dB = s A^T G with G = dL/dW (s = alpha / r);
- an 8-device CPU mesh (data 2, fsdp 2, tensor 2) gives the one-device step;
- the state holds no reference copy; its optimizer sees only the adapters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from step_testlib import A, MODEL, assert_mesh_steps_equal_one_device, make_batch, make_config

from kto_jax import step as S
from kto_jax.losses import get_loss, summarize_metrics
from kto_jax.models import lora as lora_lib
from kto_jax.models.transformer import Transformer
from kto_jax.sharding import make_mesh
from kto_jax.step import adapters
from kto_jax.step import stats as step_stats
from kto_jax.step.optimizer import make_optimizer
from kto_jax.step.train_step import accumulate_gradients
from kto_jax.train.settings import resolved_lora, step_settings

RANK, ALPHA = 4, 8.0


def lora_config(loss="kto", **kw):
    cfg = make_config(loss)
    cfg.lora.rank, cfg.lora.alpha = RANK, ALPHA
    for k, v in kw.items():
        cfg.lora[k] = v
    return cfg


def build(cfg, mesh, b_scale=0.0):
    """(graphdef, state, shardings, tx, schedule) of a LoRA run on `mesh`; B = b_scale * N(0, 1)."""
    lcfg = resolved_lora(cfg, MODEL, get_loss(cfg.loss.name))
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    ad = lora_lib.LoraAdapters(MODEL, lcfg, rngs=nnx.Rngs(1))
    for i, t in enumerate(ad.targets):
        b = getattr(ad, t + lora_lib.B_SUFFIX)
        b.set_value(b_scale * jax.random.normal(jax.random.key(10 + i), b[...].shape))
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, view = S.split_lora(model, ad, lcfg)
    state, shardings = S.init_sharded_state(step_settings(cfg), tx, mesh, MODEL.hidden_size,
                                            lambda v: v, view)
    return graphdef, state, shardings, tx, schedule


def one_device():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def test_lora_state_holds_no_reference_copy_and_trains_only_adapters():
    cfg = lora_config()
    graphdef, state, _, _, _ = build(cfg, one_device())
    assert isinstance(graphdef, adapters.LoraGraph)
    assert state.reference_params is None  # the reference is the base with adapters off
    base_leaves = jax.tree.leaves(state.base_params)
    adapter_n = sum(x.size for x in jax.tree.leaves(state.params))
    assert adapter_n == sum(np.prod(a) + np.prod(b) for a, b in
                            (lora_lib.factor_shapes(MODEL, RANK, t) for t in lora_lib.TARGET_MODULES))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapter_n  # Adam's mu and nu of the adapters only
    assert sum(x.size for x in base_leaves) > adapter_n


@pytest.mark.slow
def test_step0_policy_equals_reference_exactly():
    """B = 0: the policy's forward (base + adapters) gives the reference's (base alone) log-probs
    bit for bit on the same rows, for the matched and the KL completions. In the step the
    reference runs both in one 2M-row forward, the policy M rows at a time, so the step's
    rewards and KL are 0 up to XLA's batch-shape rounding (1 ulp of a log-prob)."""
    cfg = lora_config()
    graphdef, state, shardings, tx, schedule = build(cfg, one_device())
    batch = make_batch(3)
    mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    policy, reference = adapters.policy_and_reference(state.params, adapters.frozen_inputs(graphdef, state))
    assert reference.adapters is None and policy.base is reference.base  # one set of base weights
    y_kl, ym_kl = step_stats.kl_completions(mb["completion_ids"], mb["completion_mask"])
    for y, ym in ((mb["completion_ids"], mb["completion_mask"]), (y_kl, ym_kl)):
        pol, ref = (jax.jit(lambda p: step_stats.forward(graphdef, p, mb["prompt_ids"], mb["prompt_mask"],
                                                           y, ym, 48))(v) for v in (policy, reference))
        np.testing.assert_array_equal(pol.logps, ref.logps)
        np.testing.assert_array_equal(pol.token_logps, ref.token_logps)
    step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, one_device(), shardings)
    _, metrics = step(state, batch)
    summary = summarize_metrics(jax.device_get(metrics))
    rewards = {k: v for k, v in summary.items()
               if (k.startswith("rewards/") and "accurac" not in k) or k in ("kl", "z0")}
    assert rewards and all(abs(v) <= 1e-6 for v in rewards.values()), rewards
    assert float(metrics["grad_norm"]) > 0  # A != 0: B gets a gradient at step 0


@pytest.mark.slow
def test_lora_gradient_is_projection_of_full_gradient():
    """With B != 0 the adapter gradient is (s G B^T, s A^T G), G the full gradient at W + s A B."""
    cfg = lora_config()
    graphdef, state, _, _, _ = build(cfg, one_device(), b_scale=0.05)
    settings = step_settings(cfg)
    batch = {k: jnp.asarray(v) for k, v in make_batch(5).items()}
    lora_grads, lora_loss, _, _, _ = accumulate_gradients(
        (state.params, None), adapters.frozen_inputs(graphdef, state), batch, graphdef=graphdef,
        settings=settings)
    # the full-parameter step at the merged weights, the reference the base
    base = nnx.merge(graphdef.base, state.base_params)
    ad = nnx.merge(graphdef.adapters, state.params)
    full_graph, merged = S.split_model(lora_lib.merge(base, ad))
    full_grads, full_loss, _, _, _ = accumulate_gradients(
        (merged, None), state.base_params, batch, graphdef=full_graph, settings=settings)
    np.testing.assert_allclose(lora_loss, full_loss, rtol=1e-6)
    g_ad = nnx.merge(graphdef.adapters, lora_grads[0])
    for t in ad.targets:
        a, b = (np.asarray(x, np.float64) for x in ad.factors(t))
        g = np.asarray(full_grads[0]["layers"][t][...], np.float64)
        n, r = a.shape[0], a.shape[-1]
        a2, b2 = a.reshape(n, -1, r), b.reshape(n, r, -1)
        g2 = g.reshape(n, a2.shape[1], b2.shape[2])
        want_a = ad.scale * np.einsum("lio,lro->lir", g2, b2)
        want_b = ad.scale * np.einsum("lir,lio->lro", a2, g2)
        got_a, got_b = (np.asarray(x, np.float64) for x in g_ad.factors(t))
        scale = np.abs(want_b).max()
        assert scale > 0
        np.testing.assert_allclose(got_a.reshape(want_a.shape), want_a, atol=1e-5 * np.abs(want_a).max())
        np.testing.assert_allclose(got_b.reshape(want_b.shape), want_b, atol=1e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_eight_device_mesh_gives_the_one_device_lora_step(dropout):
    cfg = lora_config(dropout=dropout)
    assert_mesh_steps_equal_one_device(lambda mesh: build(cfg, mesh, b_scale=0.02), cfg,
                                       {"data": 2, "fsdp": 2, "tensor": 2}, make_batch(7))


@pytest.mark.slow
def test_dropout_changes_the_policy_forward_but_not_the_reference():
    """With dropout, the policy logps at step 0 differ from the reference (x is dropped before
    A), the reference forward does not see the key."""
    cfg = lora_config(dropout=0.5)
    graphdef, state, _, _, _ = build(cfg, one_device(), b_scale=0.05)
    mb = {k: jnp.asarray(v[0]) for k, v in make_batch(3).items()}
    keys = adapters.microbatch_dropout_keys(graphdef, state.rng, state.step, A)
    assert keys.shape == (A, 2)
    loss = get_loss("kto")
    no_drop = adapters.policy_and_reference(state.params, adapters.frozen_inputs(graphdef, state))
    drop = adapters.policy_and_reference(state.params, adapters.frozen_inputs(graphdef, state, keys[0]))
    kw = dict(reference_source="model", vocab_chunk=48)
    s0 = step_stats.unpaired_stats(loss, graphdef, *no_drop, None, mb, **kw)
    s1 = step_stats.unpaired_stats(loss, graphdef, *drop, None, mb, **kw)
    np.testing.assert_array_equal(s0["reference_logps"], s1["reference_logps"])
    assert not np.allclose(s0["policy_logps"], s1["policy_logps"])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "ppo_offline", "kto_reference_free"])
def test_every_kind_of_loss_trains_with_lora(loss):
    """Paired, reference-free, SFT and value-head losses run a finite LoRA step that changes the
    adapters (and offline PPO's value head, trained in full)."""
    cfg = lora_config(loss)
    if loss == "kto_reference_free":
        cfg.reference.source = "none"
    graphdef, state, shardings, tx, schedule = build(cfg, one_device())
    before = jax.device_get((state.params, state.value_head))
    step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, one_device(), shardings)
    state, metrics = step(state, make_batch(2, paired=get_loss(loss).paired))
    assert np.isfinite(float(metrics["grad_norm"])) and int(metrics["skipped_updates"]) == 0
    after = jax.device_get((state.params, state.value_head))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert any(changed)
    if loss == "ppo_offline":
        assert any(not np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1])))


@pytest.mark.slow
def test_precomputed_reference_with_lora_matches_the_model_reference():
    """reference.source=precomputed: the batch's stored logps (those of the base) give the step
    the model reference gives."""
    cfg = lora_config()
    graphdef, state, shardings, tx, schedule = build(cfg, one_device(), b_scale=0.02)
    batch = make_batch(4)
    stored = jax.jit(lambda base, b: S.train_step.reference_step(
        adapters.LoraView(base), b, loss=get_loss("kto"), graphdef=graphdef, vocab_chunk=48)
    )(state.base_params, batch)
    cfg_pre = lora_config()
    cfg_pre.reference.source = "precomputed"
    step_model = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, one_device(), shardings)
    step_pre = S.make_train_step(step_settings(cfg_pre), graphdef, tx, schedule, one_device(), shardings)
    s1 = jax.tree.map(lambda x: x.copy(), state)
    _, m_model = step_model(state, batch)
    _, m_pre = step_pre(s1, dict(batch, **jax.device_get(stored)))
    np.testing.assert_allclose(m_model["grad_norm"], m_pre["grad_norm"], rtol=1e-6)


def test_bad_lora_settings_are_user_errors_before_anything_is_built(tmp_path):
    from kto_jax.errors import UserError
    for kw, message in (({"rank": -1}, "config.lora.rank=-1"), ({"alpha": 0.0}, "config.lora.alpha"),
                        ({"target_modules": ("q_proj", "qkv")}, "unknown module(s) qkv"),
                        ({"init_from": str(tmp_path)}, "adapter_config.json")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolved_lora(lora_config(**kw), MODEL, get_loss("kto"))
    cfg = lora_config(init_from=str(tmp_path))
    cfg.reference.source = "precomputed"  # stored base log-probs are not base + adapter
    with pytest.raises(UserError, match="reference.source='model'"):
        resolved_lora(cfg, MODEL, get_loss("kto"))
    assert resolved_lora(make_config(), MODEL, get_loss("kto")) is None  # rank 0: off
