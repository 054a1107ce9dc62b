"""LoRA steps on a quantised base (QLoRA): the same computation as on its dequantised weights.

The base is a random tiny model quantised on the host (NF4 with double quantisation, and
int8); the reference run holds the SAME dequantised weights as ordinary float32 params.
KTO and DPO train steps (loss, metrics, updated adapters), on one device and on an
8-device mesh, and the packed step (against the padded one) agree; the state keeps the
codes (uint8 / int8), never a float copy of the projections.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from step_testlib import MODEL, make_batch, make_config, packed_like

from kto_jax import step as S
from kto_jax.losses import get_loss
from kto_jax.models import lora as lora_lib
from kto_jax.models.quantized_base import Quantization, dequantized_model, quantize_model
from kto_jax.models.quantized_layers import QuantizedParam
from kto_jax.models.transformer import Transformer
from kto_jax.sharding import make_mesh
from kto_jax.step import adapters
from kto_jax.step.optimizer import make_optimizer
from kto_jax.step.train_step import accumulate_gradients
from kto_jax.train.settings import resolved_lora, step_settings

QMODEL = MODEL.replace(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)  # NF4: inputs % 64
NF4 = Quantization("nf4", double_quant=True)


def lora_config(loss):
    cfg = make_config(loss)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    return cfg


def models(quantization):
    """(quantised base, the same weights dequantised as a float32 model)."""
    quantized = quantize_model(Transformer(QMODEL, rngs=nnx.Rngs(0)), quantization)
    return quantized, dequantized_model(quantized)


def build(cfg, model, mesh):
    lcfg = resolved_lora(cfg, model.config, get_loss(cfg.loss.name))
    ad = lora_lib.LoraAdapters(model.config, lcfg, rngs=nnx.Rngs(1))
    for i, t in enumerate(ad.targets):
        b = getattr(ad, t + lora_lib.B_SUFFIX)
        b.set_value(0.02 * jax.random.normal(jax.random.key(10 + i), b[...].shape))
    tx, schedule = make_optimizer(cfg.optim, 100)
    graphdef, view = S.split_lora(model, ad, lcfg)
    state, shardings = S.init_sharded_state(step_settings(cfg), tx, mesh, QMODEL.hidden_size,
                                            lambda v: v, view)
    return S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings), graphdef, state


def two_steps(cfg, model, mesh, batch):
    step, _, state = build(cfg, model, mesh)
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, metrics = step(state, batch)
    return jax.device_get(state.params), jax.device_get(metrics), state


def one_device():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.mark.parametrize("loss, quantization", [
    ("kto", NF4), pytest.param("dpo", NF4, marks=pytest.mark.slow),
    pytest.param("kto", Quantization("int8"), marks=pytest.mark.slow)], ids=["kto-nf4dq", "dpo-nf4dq", "kto-int8"])
def test_steps_on_a_quantised_base_equal_steps_on_its_dequantised_weights(loss, quantization):
    cfg = lora_config(loss)
    batch = make_batch(7, paired=get_loss(loss).paired)
    quantized, dequantized = models(quantization)
    p_q, m_q, state = two_steps(cfg, quantized, one_device(), batch)
    p_f, m_f, _ = two_steps(cfg, dequantized, one_device(), batch)
    codes = [x for x in jax.tree.leaves(state.base_params) if x.dtype in (jnp.uint8, jnp.int8)]
    assert codes and state.base_params["layers"]["q_proj"]["codes"].dtype == codes[0].dtype
    assert isinstance(state.base_params["layers"]["q_proj"]["codes"], QuantizedParam)
    assert "q_proj" not in [k for k, v in state.base_params["layers"].items() if hasattr(v, "get_value")]
    assert float(m_q["grad_norm"]) > 0
    # (XLA may fuse the in-scan dequantisation (DYNAMIC_CODE * scale + offset) into one
    # fused multiply-add: a weight can differ by one float32 ulp from the eager one)
    for key in m_f:
        np.testing.assert_allclose(m_q[key], m_f[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p_q), jax.tree.leaves(p_f)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # ... and the quantisation matters: the float model it came from trains otherwise
    p_orig, _, _ = two_steps(cfg, Transformer(QMODEL, rngs=nnx.Rngs(0)), one_device(), batch)
    diff = lambda p: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_q)))
    assert diff(p_orig) > 10 * diff(p_f), (diff(p_orig), diff(p_f))


@pytest.mark.slow
def test_an_eight_device_mesh_gives_the_one_device_qlora_step():
    cfg = lora_config("kto")
    batch = make_batch(8)
    quantized, _ = models(NF4)
    p1, m1, _ = two_steps(cfg, quantized, one_device(), batch)
    p8, m8, state = two_steps(cfg, quantized, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), batch)
    codes = state.base_params["layers"]["q_proj"]["codes"][...]
    assert codes.sharding.spec[1] == "fsdp"   # the codes are sharded like the weight's inputs
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base", ["nf4", "float"])
@pytest.mark.parametrize("kl_share", [0.0, 0.5], ids=["trees", "kl_stream"])
def test_packed_qlora_step_equals_the_padded_one(kl_share, base):
    """QLoRA (NF4 base) and LoRA (its dequantised float base): packed [x | y | y_kl] trees and
    main + kl rows (the KL completions run without a backward) = the padded step."""
    cfg = lora_config("kto")
    quantized, dequantized = models(NF4)
    _, graphdef, state = build(cfg, quantized if base == "nf4" else dequantized, one_device())
    batch = make_batch(21)
    packed = packed_like(batch, kl_share=kl_share)
    assert ("kl_row_ids" in packed) == (kl_share > 0)
    settings = step_settings(cfg)
    fn = jax.jit(lambda b: accumulate_gradients((state.params, None), adapters.frozen_inputs(graphdef, state), b,
                                                graphdef=graphdef, settings=settings))
    grads, loss, metrics, _, _ = fn(batch)
    p_grads, p_loss, p_metrics, _, _ = fn(packed)
    np.testing.assert_allclose(p_loss, loss, rtol=1e-5, atol=1e-5)
    for key in metrics:
        np.testing.assert_allclose(p_metrics[key], metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-4
    for a, b in zip(jax.tree.leaves(p_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-5)
