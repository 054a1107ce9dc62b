"""Activation sharding constraints (kto_jax.sharding.constrain) on a data=4 x fsdp=2 mesh.

Without them XLA's partitioner keeps the fsdp-sharded weights in place and moves the
[B, T, ...] activations instead (all-gathers across 'fsdp', or all-reduces of partial
sums over the fsdp-split 'embed' dim); with them each layer's activations stay split
over the batch shards and the weights are gathered (ZeRO-3).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny_models import base_config
from jax.sharding import NamedSharding, PartitionSpec as P

from kto_jax import sharding as shd
from kto_jax.models.config import tiny
from kto_jax.models.transformer import Transformer

RULES = base_config().mesh.rules
CFG = tiny(dtype="float32", param_dtype="float32")
B, T = 8, 13  # T prime: a dim of 13 in a collective's shape is the sequence axis of an activation


def _grads(params, input_ids, graphdef):
    """Gradient of sum(hidden_states ** 2) w.r.t. the params: the training pattern."""
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), input_ids.shape)
    loss = lambda params: jnp.sum(nnx.merge(graphdef, params).hidden_states(input_ids, positions, None) ** 2)
    return jax.grad(loss)(params)


@pytest.fixture(scope="module")
def setup():
    mesh = shd.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    p_sh = shd.named_shardings(params, mesh, RULES)
    ids_sh = NamedSharding(mesh, P(("data", "fsdp")))
    return dict(mesh=mesh, graphdef=graphdef, params=params, ids=ids, p_sh=p_sh, ids_sh=ids_sh)


def _compiled(setup, constrained: bool):
    """(jitted, compiled) gradient program, compiled once per module and mode."""
    if constrained in setup:
        return setup[constrained]
    fn = functools.partial(_grads, graphdef=setup["graphdef"])
    fn = shd.activation_sharding(fn, setup["mesh"], RULES) if constrained else fn
    jitted = jax.jit(fn, in_shardings=(setup["p_sh"], setup["ids_sh"]), out_shardings=setup["p_sh"])
    setup[constrained] = jitted, jitted.lower(setup["params"], setup["ids"]).compile()
    return setup[constrained]


_OPS = "all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute"
_COLLECTIVE = re.compile(rf"= (.*?) ({_OPS})(-start)?\(")


def _layer_collectives(hlo: str) -> dict[str, list[tuple[int, ...]]]:
    """{collective: result shapes} inside the decoder layers' scan (a while loop)."""
    found: dict[str, list[tuple[int, ...]]] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m and re.search(r'op_name="[^"]*/while/', line):
            shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            found.setdefault(m.group(2), []).extend(tuple(int(d) for d in s.split(",") if d) for s in shapes)
    return found


def _activation_collectives(found: dict[str, list[tuple[int, ...]]]) -> dict[str, list[tuple[int, ...]]]:
    return {op: [s for s in shapes if T in s] for op, shapes in found.items() if any(T in s for s in shapes)}


def test_constrain_is_a_no_op_without_rules_or_mesh(setup):
    x = jnp.ones((B, T, CFG.hidden_size))
    assert shd.constrain(x, ("batch", "length", "embed")) is x            # no rules, no mesh
    with shd.activation_rules(RULES):
        assert shd.constrain(x, ("batch", "length", "embed")) is x        # rules, no mesh
    with jax.set_mesh(setup["mesh"]):
        assert shd.constrain(x, ("batch", "length", "embed")) is x        # mesh, no rules


def test_layers_gather_weights_not_activations(setup):
    _, plain = _compiled(setup, constrained=False)
    _, constrained = _compiled(setup, constrained=True)
    # Unconstrained, XLA moves [B, T, ...] activations between devices inside the layers
    # (partial sums over the fsdp-split 'embed' dim are all-reduced): the regression guarded here.
    assert _activation_collectives(_layer_collectives(plain.as_text()))
    # Constrained: inside the layers only weights travel (gathered on 'embed', ZeRO-3 style).
    found = _layer_collectives(constrained.as_text())
    assert not _activation_collectives(found), found
    assert (CFG.hidden_size, CFG.intermediate_size) in found.get("all-gather", []), found


def test_constrained_gradients_match_one_device(setup):
    jitted, _ = _compiled(setup, constrained=True)
    want = jax.jit(functools.partial(_grads, graphdef=setup["graphdef"]))(setup["params"], setup["ids"])
    got = jitted(jax.device_put(setup["params"], setup["p_sh"]),
                 jax.device_put(setup["ids"], setup["ids_sh"]))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # f32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max())))
