"""A mixture of experts in the train step: the router's load-balancing loss is added to the
training loss (times router_aux_loss_coef) and logged apart; 0 turns it off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from step_testlib import assert_mesh_steps_equal_one_device, make_batch, make_config, sharper_reference

from kto_jax.losses import summarize_metrics
from kto_jax.models import moe
from kto_jax.models.config import ModelConfig
from kto_jax.models.logprobs import left_aligned
from kto_jax.models.transformer import Transformer, positions_from_mask
from kto_jax.step.train_step import microbatch_loss
from kto_jax.sharding import make_mesh
from kto_jax.train.settings import step_settings

MOE = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=128, hidden_size=32, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, qk_norm=True, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                  router_aux_loss_coef=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Qwen3-MoE with a dense layer among the sparse ones (mlp_only_layers=[1]): its dense MLP
# weights [1, ...] and the sparse layers' router and experts [2, ...] are two stacks.
MIXED = MOE.replace(num_layers=3, dense_mlp_layers=(1,), intermediate_size=48)


def _graphdef(config):
    return nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)


@pytest.mark.slow
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


def _expert_lora_run(mesh, targets=EXPERT_LORA, model_config=MOE):
    """(graphdef, state, shardings, tx, schedule, cfg) of a KTO run of MOE with LoRA on its
    attention's q and every expert's gate/up/down; B random so every gradient is non-zero."""
    from kto_jax import step as S
    from kto_jax.losses import get_loss
    from kto_jax.models import lora as lora_lib
    from kto_jax.step.optimizer import make_optimizer
    from kto_jax.train.settings import resolved_lora

    cfg = make_config()
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules = 3, 6.0, targets
    lcfg = resolved_lora(cfg, model_config, get_loss(cfg.loss.name))
    ad = lora_lib.LoraAdapters(model_config, lcfg, rngs=nnx.Rngs(1))
    for i, t in enumerate(ad.targets):
        b = getattr(ad, t + lora_lib.B_SUFFIX)
        b.set_value(0.05 * jax.random.normal(jax.random.key(10 + i), b[...].shape))
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, view = S.split_lora(Transformer(model_config, rngs=nnx.Rngs(0)), ad, lcfg)
    state, shardings = S.init_sharded_state(step_settings(cfg), tx, mesh, model_config.hidden_size, lambda v: v,
                                            view)
    return graphdef, state, shardings, tx, schedule, cfg


@pytest.mark.slow
@pytest.mark.parametrize("model_config", [MOE, MIXED], ids=["sparse", "dense_layer"])
def test_expert_lora_gradient_is_the_projection_of_the_merged_models_gradient(model_config):
    """A KTO step's gradient with LoRA on the experts (grouped matmuls) = the full-parameter
    gradient G at the merged weights W_e + s A_e B_e projected: dA_e = s G_e B_e^T,
    dB_e = s A_e^T G_e (gate_up: G = [G_gate | G_up]); the losses agree. Also with a dense
    layer among the sparse ones (the factors stack the sparse layers, as the experts)."""
    from kto_jax import step as S
    from kto_jax.models import lora as lora_lib
    from kto_jax.sharding import make_mesh
    from kto_jax.step import adapters
    from kto_jax.step.train_step import accumulate_gradients

    graphdef, state, _, _, _, cfg = _expert_lora_run(make_mesh({"data": 1}, jax.devices()[:1]),
                                                     model_config=model_config)
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
    cfg = _expert_lora_run(make_mesh({"data": 1}, jax.devices()[:1]))[-1]
    assert_mesh_steps_equal_one_device(lambda mesh: _expert_lora_run(mesh)[:5], cfg,
                                       {"data": 2, "expert": 4}, make_batch(7))


def _layer_by_layer_hidden_states(self, input_ids, positions=None, attention_mask=None, packed=None,
                                  router_weight=None, kl_rows=None):
    """`Transformer.hidden_states` of a model with dense and sparse layers assembled by hand: a
    Python loop over the layers, each taking its own weights out of its stacks and running as
    the plain model of its kind (a dense Qwen3 layer or an all-sparse Qwen3-MoE layer); no
    scan, no cond. Causal attention only (the padded step's rows)."""
    from kto_jax.models.config import LayerKind
    from kto_jax.models.transformer import (attend, decoder_layer, project_out, project_qkv, rope_tables,
                                            rotate)
    assert packed is None and kl_rows is None and attention_mask is None
    cfg = self.config
    sparse_cfg = cfg.replace(dense_mlp_layers=())
    dense_cfg = sparse_cfg.replace(architecture="Qwen3ForCausalLM", num_experts=None, num_experts_per_tok=None,
                                   moe_intermediate_size=None, norm_topk_prob=False, router_aux_loss_coef=0.0)
    ropes = rope_tables(positions, cfg)

    def attention(p, x):
        q, k, v = rotate(LayerKind(), *project_qkv(p, x, cfg, cfg.family.norm), ropes=ropes)
        out = attend(q, k, v, None, scale=cfg.attention_scale, window=None, impl=cfg.attention_impl)
        return project_out(p, out), None

    h, stats = self.embed(input_ids), []
    dense_row = sparse_row = 0
    for i in range(cfg.num_layers):
        dense = i in cfg.dense_mlp_layers
        mine = dense_cfg if dense else sparse_cfg
        p = {}
        for row in mine.family.rows:  # this layer's weights: row i, or its row of its MLP stack
            if row.stacked:
                name = row.path[-1]
                stack = getattr(self.layers, name)[...]
                mlp = len(cfg.stack_layers(name)) != cfg.num_layers
                p[name] = stack[(dense_row if dense else sparse_row) if mlp else i]
        h, _, router = decoder_layer(p, h, attention, mine, None if dense else router_weight)
        stats += [] if router is None else [router]
        dense_row, sparse_row = dense_row + dense, sparse_row + (not dense)
    hidden = cfg.family.norm(h, self.norm[...], cfg.rms_norm_eps)
    return hidden if router_weight is None else (hidden, jnp.stack(stats))


@pytest.mark.slow
def test_dense_and_sparse_layers_train_like_a_layer_by_layer_forward(monkeypatch):
    """A KTO microbatch (with the load-balancing loss over the two sparse layers) on the model
    with a dense layer gives the loss and gradients of the same weights run layer by layer by
    hand; every stack (attention [3], dense MLP [1], router and experts [2]) gets a gradient."""
    graphdef, params = _graphdef(MIXED)
    assert params["layers"]["gate_proj"][...].shape[0] == 1 and params["layers"]["router"][...].shape[0] == 2
    reference = sharper_reference(params)
    settings = step_settings(make_config())
    mb = {k: jnp.asarray(v[0]) for k, v in make_batch(3).items()}

    def scaled(p):
        return microbatch_loss((p, None), reference, mb, graphdef=graphdef, settings=settings)

    (loss, metrics), grads = jax.value_and_grad(scaled, has_aux=True)(params)
    monkeypatch.setattr(Transformer, "hidden_states", _layer_by_layer_hidden_states)
    (want_loss, want_metrics), want_grads = jax.value_and_grad(scaled, has_aux=True)(params)
    assert float(metrics["router_aux_loss_sum"]) > 0
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["router_aux_loss_sum"]), float(want_metrics["router_aux_loss_sum"]),
                               rtol=1e-6)
    for name in ("q_proj", "gate_proj", "down_proj", "router", "expert_gate_proj", "expert_down_proj"):
        got, want = np.asarray(grads["layers"][name][...]), np.asarray(want_grads["layers"][name][...])
        for row in range(got.shape[0]):
            assert np.abs(got[row]).max() > 0, (name, row)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)
