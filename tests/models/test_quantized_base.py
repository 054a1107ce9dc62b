"""Loading a base quantised on the way in: every projection as quantize_weight makes it from
the checkpoint's tensor, placed on its sharding; the rest as from_pretrained loads it; errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny_models import make_hf_model
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models import from_pretrained
from kto_jax.models import quantize as qz
from kto_jax.models.hf_io import read_hf_config
from kto_jax.models.quantized_base import (
    Quantization, dequantized_model, load_quantized, load_quantized_from_source, quantize_model, quantized_rows)
from kto_jax.models.tensor_source import SafetensorsSource

RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("vocab", "tensor"), ("layers", None), ("head_dim", None))
SCHEMES = [Quantization("int8"), Quantization("nf4"), Quantization("nf4", double_quant=True)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen2 (q/k/v biases, untied lm_head, GQA 4/2, D 64, F 128) in float32."""
    path = str(tmp_path_factory.mktemp("qwen2"))
    make_hf_model("qwen2").save_pretrained(path)
    return path


class CountingSource:
    """A TensorSource that counts reads per tensor."""

    def __init__(self, source):
        self.source, self.reads = source, {}

    def names(self):
        return self.source.names()

    def get(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.source.get(name)


@pytest.mark.parametrize("quantization", SCHEMES, ids=lambda q: q.scheme + ("_double" if q.double_quant else ""))
def test_loads_every_projection_quantised_and_the_rest_as_from_pretrained(checkpoint, quantization):
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    source = CountingSource(SafetensorsSource(checkpoint))
    base = load_quantized_from_source(read_hf_config(checkpoint), source, quantization, mesh=mesh, rules=RULES)
    assert set(source.reads) == source.source.names() and set(source.reads.values()) == {1}
    config = base.config
    tensors = load_file(f"{checkpoint}/model.safetensors")
    rows = quantized_rows(config)
    assert set(base.layers) == set(rows) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    for name, (row, n_in) in rows.items():
        got = base.layers[name]
        shape = got.shape
        want = qz.stack([qz.quantize_weight(tensors[row.hf_name.format(i=i)], shape, n_in, quantization.scheme,
                                            quantization.double_quant) for i in range(config.num_layers)])
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(g), w)
    # The codes are sharded like the weight: q_proj's inputs (embed) on fsdp, its heads on tensor.
    assert base.layers["q_proj"].codes.sharding.spec == P(None, "fsdp", "tensor", None)
    assert base.layers["down_proj"].codes.sharding.spec == P(None, "tensor", "fsdp")
    model, _ = from_pretrained(checkpoint, mesh=mesh, rules=RULES)
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(base.params) == set(flat) - {("layers", n) for n in rows}
    for path, value in base.params.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[path]))
        assert value.sharding == flat[path].sharding
    # Dequantised, each projection is the checkpoint's weight up to the scheme's rounding.
    weights = jax.jit(lambda layers: {n: qz.dequantize(w, jnp.float32) for n, w in layers.items()})(base.layers)
    for name in rows:
        w = np.asarray(flat[("layers", name)])
        err = np.abs(np.asarray(weights[name]) - w).max()
        assert 0 < err < (0.02 if quantization.scheme == "int8" else 0.2) * np.abs(w).max()


def test_refusals(checkpoint, tmp_path):
    with pytest.raises(UserError, match="double quantisation"):
        Quantization("int8", double_quant=True)
    with pytest.raises(UserError, match="choose none, int8, nf4"):
        Quantization("nf3")
    # A model whose hidden size (48) is not a whole number of NF4 blocks: named, int8 offered.
    hf = {**read_hf_config(checkpoint), "hidden_size": 48}
    with pytest.raises(UserError, match=r"q_proj \(input size 48\).*int8 instead"):
        load_quantized_from_source(hf, SafetensorsSource(checkpoint), Quantization("nf4"))
    # A tensor of the wrong shape is named before it is quantised.
    shutil.copytree(checkpoint, tmp_path / "bad")
    tensors = load_file(f"{checkpoint}/model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:64]
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model.layers.1.mlp.up_proj.weight' has shape \(64, 64\)"):
        load_quantized(str(tmp_path / "bad"), Quantization("nf4"))


@pytest.mark.parametrize("quantization", SCHEMES, ids=lambda q: q.scheme + ("_double" if q.double_quant else ""))
def test_quantised_model_computes_with_its_dequantised_weights(checkpoint, quantization):
    """from_pretrained(quantization=...) gives a Transformer whose projections stay quantised
    (codes and scales as load_quantized reads them, on their shardings) and whose forward is
    the forward of the same model with the dequantised weights as ordinary float32 weights;
    quantize_model of the float model gives the same arrays."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model, config = from_pretrained(checkpoint, mesh=mesh, rules=RULES, quantization=quantization)
    assert config.quantization == quantization and model.config == config
    base = load_quantized(checkpoint, quantization, mesh=mesh, rules=RULES)
    for name, w in base.layers.items():
        got = getattr(model.layers, name)[...]
        assert type(got) is type(w)
        for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(w)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(x))
            assert g.sharding == x.sharding
    float_model, _ = from_pretrained(checkpoint)
    again = quantize_model(float_model, quantization)
    for name in base.layers:
        for g, x in zip(jax.tree.leaves(getattr(again.layers, name)[...]), jax.tree.leaves(base.layers[name])):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(x))
    reference = dequantized_model(again)
    assert reference.config.quantization == Quantization()
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, config.vocab_size)
    mask = jnp.ones((2, 12), jnp.int32).at[1, :3].set(0)
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    want = np.asarray(reference(ids, positions, mask))
    for m in (model, again):
        np.testing.assert_allclose(np.asarray(jax.jit(lambda m, *a: m(*a))(m, ids, positions, mask)), want,
                                   rtol=2e-5, atol=2e-5)
    # ... and not the float model's: the rounding is there.
    assert np.abs(np.asarray(float_model(ids, positions, mask)) - want).max() > 1e-4
