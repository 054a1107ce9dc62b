"""kto_jax.sharding: mesh sizes, logical-axis rules, NamedShardings of an NNX state."""

import jax
import pytest
from flax import nnx
from hf_tiny_models import base_config
from jax.sharding import PartitionSpec as P

from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models.config import tiny
from kto_jax.models.transformer import abstract_model

RULES = base_config().mesh.rules


@pytest.mark.parametrize("sizes,want", [
    ({"data": -1, "fsdp": 4, "tensor": 2}, (1, 4, 1, 2)),
    ({"data": 2, "fsdp": -1, "tensor": 1}, (2, 4, 1, 1)),
    ({"data": 8, "fsdp": 1, "tensor": 1}, (8, 1, 1, 1)),
    ({"data": 2, "expert": 4}, (2, 1, 4, 1)),
])
def test_mesh_shape(sizes, want):
    assert shd.mesh_shape(sizes, 8) == want


@pytest.mark.parametrize("sizes,match", [
    ({"data": -1, "fsdp": 3, "tensor": 1}, "do not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "need 4 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
])
def test_mesh_shape_errors(sizes, match):
    with pytest.raises(UserError, match=match):
        shd.mesh_shape(sizes, 8)


def test_make_mesh_from_config_and_one_device():
    mesh = shd.make_mesh(base_config().mesh)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = shd.make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert one.size == 1


def test_logical_to_mesh():
    assert shd.rules_of(base_config().mesh) == shd.rules_of(RULES)  # config.mesh or its rules
    assert shd.logical_to_mesh(("layers", "embed", "heads", "head_dim"), RULES) == P(None, "fsdp", "tensor", None)
    assert shd.logical_to_mesh(("batch", "length"), RULES) == P(("data", "fsdp", "expert"), None)
    assert shd.logical_to_mesh(("layers", "expert", "embed", "mlp"), RULES) == P(None, "expert", "fsdp", "tensor")
    assert shd.logical_to_mesh(("heads", "mlp"), RULES) == P("tensor", None)  # a mesh axis is used once
    assert shd.logical_to_mesh(("unknown", None), RULES) == P(None, None)


def test_non_dividing_mesh_axis_is_dropped():
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    assert shd.logical_to_mesh(("embed", "kv_heads", "head_dim"), RULES, (64, 2, 16), mesh) == P("fsdp", None, None)
    assert shd.logical_to_mesh(("batch",), RULES, (3,), mesh) == P(("data", "expert"))  # both of size 1


def test_named_shardings_of_a_model_state():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = nnx.state(abstract_model(tiny()))
    flat = dict(nnx.to_flat_state(shd.named_shardings(state, mesh, RULES)))
    assert flat[("embed_tokens",)].get_value().spec == P("tensor", "fsdp")
    assert flat[("lm_head",)].get_value().spec == P("fsdp", "tensor")
    assert flat[("layers", "down_proj")].get_value().spec == P(None, "tensor", "fsdp")
    assert flat[("layers", "o_proj")].get_value().spec == P(None, "tensor", None, "fsdp")


def test_init_model_and_shard_model_place_parameters_on_their_shardings():
    import numpy as np
    from kto_jax.models import Transformer, init_model
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model = init_model(tiny(), mesh=mesh, rules=RULES, seed=3)
    q = model.layers.q_proj[...]
    assert q.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(None, "fsdp", "tensor", None)), q.ndim)
    assert model.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    eager = shd.shard_model(Transformer(tiny(), rngs=nnx.Rngs(3)), mesh, RULES)
    assert eager.layers.gate_proj[...].sharding.spec == P(None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(eager))):
        np.testing.assert_allclose(a, b, atol=1e-7)
