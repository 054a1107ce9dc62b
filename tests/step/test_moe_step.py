"""A mixture of experts in the train step: the router's load-balancing loss is added to the
training loss (times router_aux_loss_coef) and logged apart; 0 turns it off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from step_testlib import make_batch, make_config, sharper_reference

from kto_jax.losses import summarize_metrics
from kto_jax.models import moe
from kto_jax.models.config import ModelConfig
from kto_jax.models.logprobs import left_aligned
from kto_jax.models.transformer import Transformer, positions_from_mask
from kto_jax.step.train_step import microbatch_loss
from kto_jax.train.settings import step_settings

MOE = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=128, hidden_size=32, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, qk_norm=True, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                  router_aux_loss_coef=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _graphdef(config):
    return nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)


def test_router_aux_loss_is_added_to_the_loss_and_logged_apart():
    graphdef, params = _graphdef(MOE)
    off, _ = _graphdef(MOE.replace(router_aux_loss_coef=0.0))
    reference = sharper_reference(params)
    settings = step_settings(make_config())
    mb = {k: jnp.asarray(v[0]) for k, v in make_batch(0).items()}

    def scaled(p, graphdef):
        return microbatch_loss((p, None), reference, mb, graphdef=graphdef, settings=settings)

    def router_by_hand(p):  # the policy's forward on (x, y): its real tokens' load-balancing loss
        ids, mask, _ = left_aligned(mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"],
                                    mb["completion_mask"])
        _, stats = nnx.merge(graphdef, p).hidden_states(ids, positions_from_mask(mask), None,
                                                        router_weight=mask)
        return moe.load_balancing_loss(stats, mask.sum(), MOE.num_experts)

    (with_aux, metrics), grads = jax.value_and_grad(scaled, has_aux=True)(params, graphdef)
    (without, plain), grads_off = jax.value_and_grad(scaled, has_aux=True)(params, off)
    aux, aux_grads = jax.value_and_grad(router_by_hand)(params)
    d = float(metrics["loss_denominator"])
    assert "router_aux_loss_sum" not in plain
    np.testing.assert_allclose(float(metrics["router_aux_loss_sum"]) / d, float(aux), rtol=1e-6)
    np.testing.assert_allclose(float(with_aux), float(without) + d * 0.1 * float(aux), rtol=1e-6)
    summary = summarize_metrics(metrics)
    np.testing.assert_allclose(summary["router_aux_loss"], float(aux), rtol=1e-6)
    np.testing.assert_allclose(summary["loss"], float(without) / d, rtol=1e-6)  # the HALO loss alone
    router_grad = grads["layers"]["router"][...] - grads_off["layers"]["router"][...]
    assert np.abs(np.asarray(router_grad)).max() > 0
    for got, off_, extra in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_off), jax.tree.leaves(aux_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(off_) + d * 0.1 * np.asarray(extra),
                                   rtol=1e-4, atol=1e-7)


EXPERT_LORA = ("q_proj", "expert_gate_up_proj", "expert_down_proj")


def _expert_lora_run(mesh, targets=EXPERT_LORA):
    """(graphdef, state, shardings, tx, schedule, cfg) of a KTO run of MOE with LoRA on its
    attention's q and every expert's gate/up/down; B random so every gradient is non-zero."""
    from kto_jax import step as S
    from kto_jax.losses import get_loss
    from kto_jax.models import lora as lora_lib
    from kto_jax.step.optimizer import make_optimizer
    from kto_jax.train.settings import resolved_lora

    cfg = make_config()
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules = 3, 6.0, targets
    lcfg = resolved_lora(cfg, MOE, get_loss(cfg.loss.name))
    ad = lora_lib.LoraAdapters(MOE, lcfg, rngs=nnx.Rngs(1))
    for i, t in enumerate(ad.targets):
        b = getattr(ad, t + lora_lib.B_SUFFIX)
        b.set_value(0.05 * jax.random.normal(jax.random.key(10 + i), b[...].shape))
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, view = S.split_lora(Transformer(MOE, rngs=nnx.Rngs(0)), ad, lcfg)
    state, shardings = S.init_sharded_state(step_settings(cfg), tx, mesh, MOE.hidden_size, lambda v: v, view)
    return graphdef, state, shardings, tx, schedule, cfg


def test_expert_lora_gradient_is_the_projection_of_the_merged_models_gradient():
    """A KTO step's gradient with LoRA on the experts (grouped matmuls) = the full-parameter
    gradient G at the merged weights W_e + s A_e B_e projected: dA_e = s G_e B_e^T,
    dB_e = s A_e^T G_e (gate_up: G = [G_gate | G_up]); the losses agree."""
    from kto_jax import step as S
    from kto_jax.models import lora as lora_lib
    from kto_jax.sharding import make_mesh
    from kto_jax.step import adapters
    from kto_jax.step.train_step import accumulate_gradients

    graphdef, state, _, _, _, cfg = _expert_lora_run(make_mesh({"data": 1}, jax.devices()[:1]))
    settings = step_settings(cfg)
    batch = {k: jnp.asarray(v) for k, v in make_batch(5).items()}
    lora_grads, lora_loss, _, _, _ = accumulate_gradients(
        (state.params, None), adapters.frozen_inputs(graphdef, state), batch, graphdef=graphdef, settings=settings)
    ad = nnx.merge(graphdef.adapters, state.params)
    full_graph, merged = S.split_model(lora_lib.merge(nnx.merge(graphdef.base, state.base_params), ad))
    full_grads, full_loss, _, _, _ = accumulate_gradients(
        (merged, None), state.base_params, batch, graphdef=full_graph, settings=settings)
    np.testing.assert_allclose(lora_loss, full_loss, rtol=1e-6)
    g_ad = nnx.merge(graphdef.adapters, lora_grads[0])
    for t in ("expert_gate_up_proj", "expert_down_proj"):
        a, b = (np.asarray(x, np.float64) for x in ad.factors(t))
        g = np.concatenate([np.asarray(full_grads[0]["layers"][n][...], np.float64)
                            for n in lora_lib.EXPERT_TARGETS[t]], axis=-1)          # [L, E, in, out]
        want_a = ad.scale * np.einsum("leio,lero->leir", g, b)
        want_b = ad.scale * np.einsum("leir,leio->lero", a, g)
        got_a, got_b = (np.asarray(x, np.float64) for x in g_ad.factors(t))
        for got, want in ((got_a, want_a), (got_b, want_b)):
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), err_msg=t)


@pytest.mark.slow
def test_expert_lora_step_on_an_expert_mesh_equals_one_device():
    """Two KTO steps with expert LoRA on data=2 x expert=4 (8 CPU devices: the experts' A and
    B split over 'expert' as their weights) give the one-device adapters and gradient norm."""
    from kto_jax import step as S
    from kto_jax.sharding import make_mesh

    batch = make_batch(7)
    out = {}
    for name, mesh in (("one", make_mesh({"data": 1}, jax.devices()[:1])),
                       ("eight", make_mesh({"data": 2, "expert": 4}, jax.devices()[:8]))):
        graphdef, state, shardings, tx, schedule, cfg = _expert_lora_run(mesh)
        step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings)
        with jax.set_mesh(mesh):
            for _ in range(2):
                state, metrics = step(state, batch)
        out[name] = (jax.device_get(state.params), jax.device_get(metrics))
    (p1, m1), (p8, m8) = out["one"], out["eight"]
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
