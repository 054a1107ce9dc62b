"""The packed train step equals the padded one on the same examples (issue 13 item 3).

The same microbatches, once padded (kto_jax/batch.py) and once packed into rows of
whole [x | y | y_kl] (or [x | y_w | y_l]) examples (kto_jax/data/packing.py): the
loss, z0 (the `kl_sum` metric), every metric and the gradients agree within 1e-5
(float32), for every loss of the registry, with a filler row, over two microbatches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from step_testlib import (MODEL, fresh, make_batch, make_config, packed_like,
                          sharper_reference)

from kto_jax import step as S
from kto_jax.losses.registry import LOSS_NAMES, get_loss
from kto_jax.models.transformer import Transformer
from kto_jax.sharding import make_mesh
from kto_jax.step import adapters
from kto_jax.step.optimizer import make_optimizer
from kto_jax.step.train_step import accumulate_gradients
from kto_jax.train.settings import step_settings

TOL = 1e-5


def _state(cfg, model=MODEL):
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, state = S.create_train_state(step_settings(cfg), Transformer(model, rngs=nnx.Rngs(0)), tx)
    if state.reference_params is not None:
        state = state.replace(reference_params=sharper_reference(state.params))
    if state.value_head is not None:  # a non-zero last layer: the values reach the loss
        state = state.replace(value_head=jax.tree.map(lambda x: x + 0.05, state.value_head))
    return tx, schedule, graphdef, state


def _gradients(cfg, graphdef, state, batch):
    settings = step_settings(cfg)
    fn = jax.jit(functools.partial(accumulate_gradients, graphdef=graphdef, settings=settings))
    return fn((state.params, state.value_head), adapters.frozen_inputs(graphdef, state), batch,
              loss_state=state.loss_state)


def _max_abs_diff(got, want) -> float:
    """The tree max abs difference of two trees of one structure (gradients)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    return max(float(jnp.max(jnp.abs(g - w)))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


# Gemma-shaped variants of step_testlib's MODEL: sliding windows shorter than the examples
# (11 tokens), soft-capped attention and final logits the random logits reach (Gemma 2),
# q/k norms and two RoPE tables (Gemma 3).
GEMMA_MODELS = {
    "gemma2": MODEL.replace(architecture="Gemma2ForCausalLM", sliding_window=4, query_pre_attn_scalar=24,
                            attn_logit_softcap=0.05, final_logit_softcap=0.3,
                            layer_types=("sliding_attention", "full_attention")),
    "gemma3": MODEL.replace(architecture="Gemma3ForCausalLM", qk_norm=True, sliding_window=4,
                            rope_theta=1e6, rope_local_theta=1e4,
                            rope_scaling={"rope_type": "linear", "factor": 8.0},
                            layer_types=("sliding_attention", "full_attention")),
}
# A mixture of experts (4 experts, top 2): the load-balancing loss off, since a packed forward
# also routes the KL completions' tokens, which the padded policy forward does not see.
MOE_MODEL = MODEL.replace(architecture="Qwen3MoeForCausalLM", qk_norm=True, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
# ... and with it on: the packed forward weighs each token as the padded forwards count it
# (packed_logprobs.router_weights), so the aux loss, its metric and gradients agree too.
MOE_AUX_MODEL = MOE_MODEL.replace(router_aux_loss_coef=0.01)
KL_SHARE = 0.5  # the kl rows of the two-stream layout: 16 tokens beside main rows of 32


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_packed_step_equals_padded_step(name):
    _check_packed_equals_padded(name, MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("name, family", [("kto", "gemma2"), ("dpo", "gemma3")])
def test_gemma_packed_step_equals_padded_step(name, family):
    _check_packed_equals_padded(name, GEMMA_MODELS[family])


@pytest.mark.slow
def test_moe_packed_kto_step_equals_padded_step():
    _check_packed_equals_padded("kto", MOE_MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if not get_loss(n).paired])
def test_kl_stream_packed_step_equals_padded_step(name):
    """Main rows [x | y] and kl rows of y_kl (packing.pack_streams): every unpaired loss."""
    _check_packed_equals_padded(name, MODEL, kl_share=KL_SHARE)


@pytest.mark.slow
@pytest.mark.parametrize("name, family", [("kto", "gemma2"), ("kto", "gemma3")])
def test_gemma_kl_stream_packed_step_equals_padded_step(name, family):
    _check_packed_equals_padded(name, GEMMA_MODELS[family], kl_share=KL_SHARE)


@pytest.mark.slow
@pytest.mark.parametrize("name, kl_share", [("kto", KL_SHARE), ("dpo", 0.0)])
def test_moe_router_loss_packed_step_equals_padded_step(name, kl_share):
    _check_packed_equals_padded(name, MOE_AUX_MODEL, kl_share=kl_share)


@pytest.mark.slow
def test_moe_with_a_dense_layer_kl_stream_packed_step_equals_padded_step():
    """Layer 0 dense, layer 1 sparse (two MLP stacks, the scan's cond), the router loss on:
    the kl stream runs the same cond under stop_gradient."""
    _check_packed_equals_padded("kto", MOE_AUX_MODEL.replace(dense_mlp_layers=(0,)), kl_share=KL_SHARE)


def _check_packed_equals_padded(name, model, kl_share=0.0):
    paired = get_loss(name).paired
    cfg = make_config(name)
    if name == "kto_reference_free" or not get_loss(name).uses_reference:
        cfg.reference.source = "none"
    _, _, graphdef, state = _state(cfg, model)
    batch = make_batch(21, paired=paired)
    batch["valid"][1, 5] = False
    if not paired:
        batch["weight"][1, 5] = 0.0
    packed = packed_like(batch, paired, kl_share=kl_share)
    assert packed["packed_ids"].shape[1] < batch["valid"].shape[1]  # several examples per row
    assert ("kl_row_ids" in packed) == (kl_share > 0)
    grads, loss, metrics, tokens, loss_state = _gradients(cfg, graphdef, state, batch)
    p_grads, p_loss, p_metrics, p_tokens, p_loss_state = _gradients(cfg, graphdef, state, packed)
    for key in loss_state or {}:  # bco's running mean after both microbatches
        np.testing.assert_allclose(p_loss_state[key], loss_state[key], rtol=TOL, atol=TOL)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(p_loss, loss, rtol=TOL, atol=TOL)
    assert float(p_tokens) == float(tokens)
    assert set(p_metrics) == set(metrics)
    for key in metrics:
        np.testing.assert_allclose(p_metrics[key], metrics[key], rtol=TOL, atol=TOL, err_msg=key)
    if get_loss(name).uses_kl and get_loss(name).uses_reference:
        assert float(metrics["kl_sum"]) > 0.01  # z0 > 0: the KL pairs matter
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-4
    assert _max_abs_diff(p_grads, grads) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("kl_share", [0.0, KL_SHARE], ids=["trees", "kl_stream"])
def test_packed_train_and_eval_steps_on_an_8_device_mesh_equal_padded(kl_share):
    """data=4 x fsdp=2: each of the 8 batch shards packs its examples into rows of its own
    (8 packing groups); the jitted train step's update and metrics, and the eval step's
    metrics, equal the padded step on one device."""
    cfg = make_config(micro=16)
    tx, schedule, graphdef, state = _state(cfg)
    one = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    eight = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    batch = make_batch(22, micro=16)  # 2 examples per batch shard
    packed = packed_like(batch, groups=(micro_groups := 8), kl_share=kl_share)
    assert packed["packed_ids"].shape[1] % micro_groups == 0
    results = []
    for mesh, b in ((one, batch), (eight, packed)):
        shardings = S.train_state_shardings(state, tx, mesh, cfg.mesh.rules)
        s = jax.device_put(fresh(state), shardings)
        evaluated = S.make_eval_step(step_settings(cfg), graphdef, mesh, shardings)(s, b)
        new_state, metrics = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh,
                                               shardings)(s, b)
        results.append((jax.device_get(new_state.params), jax.device_get(metrics),
                        jax.device_get(evaluated)))
    (params, metrics, evaluated), (p_params, p_metrics, p_evaluated) = results
    assert float(metrics["kl_sum"]) > 0.01
    for key in metrics:
        np.testing.assert_allclose(p_metrics[key], metrics[key], rtol=2e-5, atol=1e-6, err_msg=key)
    for key in evaluated:
        np.testing.assert_allclose(p_evaluated[key], evaluated[key], rtol=2e-5, atol=1e-6,
                                   err_msg=key)
    for a, b in zip(jax.tree.leaves(p_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kl_share", [0.0, KL_SHARE], ids=["trees", "kl_stream"])
def test_packed_reference_step_gives_the_padded_per_example_values(kl_share):
    """`make_reference_step` (what `kto-jax precompute-ref` stores) on a packed batch returns
    the padded batch's [A, M] reference log-probs, KL pairs included."""
    cfg = make_config()
    _, _, graphdef, state = _state(cfg)
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    fn = S.make_reference_step(get_loss("kto"), graphdef, 48, mesh,
                               jax.tree.map(lambda _: None, state.reference_params),
                               cfg.mesh.rules)
    batch = make_batch(23)
    want = fn(state.reference_params, batch)
    got = fn(state.reference_params, packed_like(batch, groups=8, kl_share=kl_share))
    assert set(got) == {"reference_logps", "reference_kl_logps"}
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=TOL, atol=TOL, err_msg=key)


def test_a_packed_batch_without_its_gathers_is_a_user_error():
    from kto_jax.errors import UserError  # pylint: disable=import-outside-toplevel
    packed = packed_like(make_batch(24))
    del packed["kl_index"]
    with pytest.raises(UserError, match=r"\(packed\), but the batch lacks \['kl_index'\]"):
        S.check_batch(packed, get_loss("kto"))
