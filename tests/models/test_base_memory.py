"""The base's bytes per chip: what the loaders place on one device, and Llama-3-8B by hand."""

import jax
import pytest
from flax import nnx
from hf_tiny_models import make_hf_model

from kto_jax import sharding as shd
from kto_jax.models import from_pretrained
from kto_jax.models.base_memory import base_bytes_per_chip
from kto_jax.models.config import llama3_8b
from kto_jax.models.quantized_base import Quantization, load_quantized

RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("vocab", "tensor"), ("layers", None), ("head_dim", None))
MESH = {"data": 1, "fsdp": 4, "tensor": 2}


def _on_one_device(arrays) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for a in jax.tree.leaves(arrays) for s in a.addressable_shards if s.device == device)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2"))
    make_hf_model("qwen2").save_pretrained(path)
    return path


@pytest.mark.parametrize("quantization", [Quantization("none"), Quantization("int8"), Quantization("nf4"),
                                          Quantization("nf4", double_quant=True)], ids=str)
def test_equals_what_the_loader_places_on_one_device(checkpoint, quantization):
    mesh = shd.make_mesh(MESH)
    if quantization.scheme == "none":
        model, config = from_pretrained(checkpoint, mesh=mesh, rules=RULES, param_dtype="bfloat16")
        placed = {"dense": _on_one_device(nnx.state(model))}
    else:
        base = load_quantized(checkpoint, quantization, mesh=mesh, rules=RULES, param_dtype="bfloat16")
        config = base.config
        placed = {"dense": _on_one_device(base.params),
                  "codes": _on_one_device([w.codes for w in base.layers.values()]),
                  "scales": _on_one_device([w.absmax for w in base.layers.values()])}
    priced = base_bytes_per_chip(config, quantization, MESH, RULES)
    assert {k: priced[k] for k in placed} == placed and priced["total"] == sum(placed.values())
    assert priced["dense"] > 0 and (quantization.scheme == "none" or priced["codes"] > 0)


def test_llama3_8b_on_one_chip_by_hand():
    config = llama3_8b(param_dtype="bfloat16")
    d, f, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    projections = layers * (2 * d * d + 2 * d * kv + 3 * d * f)     # q, o; k, v; gate, up, down
    dense = 2 * vocab * d * 2 + (2 * layers + 1) * d * 2             # embedding, lm_head; the norms
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    assert base_bytes_per_chip(config, Quantization("none"), one, RULES)["total"] == projections * 2 + dense
    int8 = base_bytes_per_chip(config, Quantization("int8"), one, RULES)
    assert int8 == {"codes": projections, "scales": 4 * layers * (3 * d + 2 * kv + 2 * f),  # one per output
                    "dense": dense, "total": projections + int8["scales"] + dense}
    nf4 = base_bytes_per_chip(config, Quantization("nf4"), one, RULES)
    assert (nf4["codes"], nf4["scales"]) == (projections // 2, projections // 64 * 4)
    double = base_bytes_per_chip(config, Quantization("nf4", double_quant=True), one, RULES)
    stats = layers * sum(-(-(out * inp // 64) // 256) for out, inp in
                         ((d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)))
    assert double["scales"] == projections // 64 + 4 * stats + 4 * 7 * layers
    # 8B NF4 with double quantisation: 5.31 GiB of base on one chip, 14.96 GiB in bf16.
    assert round(double["total"] / 2**30, 2) == 5.31
