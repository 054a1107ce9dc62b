"""Expert parallelism (kto_jax/models/moe.py `expert_parallel`): on data=2 x expert=4 (8 CPU
devices) each device keeps 2 of a layer's 8 experts and its tokens' assignments travel to
the experts' devices by an all-to-all and back; the layer's output and gradients equal one
device's, and the compiled program gathers no expert weight whole."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kto_jax import sharding as shd
from kto_jax.models import moe
from test_moe import _config, _expert_adapters, _weights

RULES = (("batch", ("data", "fsdp", "expert")), ("embed", "fsdp"), ("expert", "expert"), ("mlp", "tensor"))
# the logical axes of the expert LoRA factors (kto_jax.models.lora: A keeps W's input axis, B its output's)
ADAPTER_AXES = {"expert_gate_up_proj_lora_a": ("expert", "embed", None),
                "expert_gate_up_proj_lora_b": ("expert", None, "mlp"),
                "expert_down_proj_lora_a": ("expert", "mlp", None),
                "expert_down_proj_lora_b": ("expert", None, "embed")}


def _layer(cfg, lora: bool, skewed: bool = False):
    """One layer's p and tokens x [8, 6, D]; `skewed`: every token picks experts 6 and 7 (both
    on the last expert device, so every assignment of every device goes to one device)."""
    p = _weights(cfg)
    if lora:
        p.update(_expert_adapters(cfg))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6, cfg.hidden_size))
    if skewed:
        x = x.at[..., 0].set(4.0)
        p["router"] = p["router"].at[0].set(jnp.zeros(cfg.num_experts).at[6:].set(3.0))
    return p, x


def _loss(p, x, cfg):
    """A fixed random projection of the layer's output (linear: no amplified rounding)."""
    y = moe.moe_mlp(p, x, cfg)
    return jnp.sum(y * jax.random.normal(jax.random.PRNGKey(5), y.shape))


def _program(cfg, mesh, rules, p):
    """The jitted value and gradient (of p and x) of `_loss` on `mesh` under `rules`."""
    def loss(p, x):
        return _loss(p, x, cfg)

    axes = {**moe.MOE_MLP.axes, **ADAPTER_AXES}
    p_sh = {n: shd.sharding_for(axes[n], v.shape, mesh, rules) for n, v in p.items()}
    x_sh = NamedSharding(mesh, P(shd.batch_axes(rules)))
    return jax.jit(shd.activation_sharding(jax.value_and_grad(loss, argnums=(0, 1)), mesh, rules),
                   in_shardings=(p_sh, x_sh)), p_sh, x_sh


def _max_rel_err(got, want) -> float:
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


@pytest.mark.parametrize("impl,lora,skewed", [("ragged", False, False), ("ragged", True, False),
                                              ("blocks", True, False), ("ragged", True, True)])
def test_expert_parallel_layer_equals_one_device(impl, lora, skewed):
    """Output, and gradients of every weight (expert LoRA factors included) and of the tokens,
    equal the one-device layer's within float32 rounding: each leaf within rtol 1e-5 and
    atol 2e-6 * its largest value (sums over the 48 tokens' assignments in another order;
    seen: max error / max value of a leaf at most 1e-6)."""
    cfg = _config(norm_topk_prob=True, moe_impl=impl)
    p, x = _layer(cfg, lora, skewed)
    if skewed:  # the case the dropless capacity is for
        _, _, experts = moe.route(p, x.reshape(48, -1), cfg)
        assert set(np.unique(np.asarray(experts))) == {6, 7}
    want = jax.jit(jax.value_and_grad(lambda p, x: _loss(p, x, cfg), argnums=(0, 1)))(p, x)
    mesh = shd.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    program, p_sh, x_sh = _program(cfg, mesh, RULES, p)
    got = program(jax.device_put(p, p_sh), jax.device_put(x, x_sh))
    assert _max_rel_err(got, want) < 5e-6
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=2e-6 * np.abs(b).max())


def _hlo_ops(text: str, op: str) -> list[list[tuple[int, ...]]]:
    """The result shapes of each `op` instruction in compiled HLO text."""
    found = []
    for line in text.splitlines():
        m = re.search(r"=\s*(.*?)\s" + re.escape(op) + r"(-start)?\(", line)
        if m:
            found.append([tuple(int(d) for d in dims.split(",") if d)
                          for dims in re.findall(r"\[([\d,]*)\]", m.group(1))])
    return found


@pytest.mark.parametrize("lora", [False, True])
def test_expert_parallel_program_moves_tokens_not_expert_weights(lora):
    """The compiled forward and backward on data=2 x expert=4 has all-to-alls and no all-gather
    whose result is a whole [E, ...] expert weight or adapter; with the batch not split over
    'expert' (the weights gathered, the tokens staying) the same check finds such gathers."""
    cfg = _config(norm_topk_prob=True)
    p, x = _layer(cfg, lora)
    whole = {tuple(v.shape) for n, v in p.items() if n != "router"}
    mesh = shd.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    for rules, parallel in ((RULES, True), ((("batch", ("data", "fsdp")),) + RULES[1:], False)):
        program, p_sh, x_sh = _program(cfg, mesh, rules, p)
        text = program.lower(jax.device_put(p, p_sh), jax.device_put(x, x_sh)).compile().as_text()
        gathered = {s for shapes in _hlo_ops(text, "all-gather") for s in shapes}
        assert bool(_hlo_ops(text, "all-to-all")) == parallel
        assert (not gathered & whole) == parallel, (gathered, whole)
