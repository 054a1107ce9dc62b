"""A mixture of experts in the train step: the router's load-balancing loss is added to the
training loss (times router_aux_loss_coef) and logged apart; 0 turns it off."""

import jax
import jax.numpy as jnp
import numpy as np
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
