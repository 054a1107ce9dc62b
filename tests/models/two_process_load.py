"""One of the two processes of tests/models/test_shard_read.py's two-process load.

`python two_process_load.py CHECKPOINT OUT_JSON` (with KTO_JAX_COORDINATOR_ADDRESS,
KTO_JAX_NUM_PROCESSES=2, KTO_JAX_PROCESS_ID and 2 CPU devices): loads CHECKPOINT on a
fsdp 2 x tensor 2 mesh (fsdp across the processes) as float32, int8 and NF4 with double
quantisation, checks every addressable shard against the whole tensor converted or
quantised here, and writes {load: {tensor: bytes this process read}} to OUT_JSON
(load: "float32", "int8", "nf4").
"""

import json
import sys

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from kto_jax import sharding as shd
from kto_jax.models import from_pretrained, tensor_source
from kto_jax.models import params as table
from kto_jax.models import quantize as qz
from kto_jax.models.quantized_base import Quantization, load_quantized, quantized_rows
from kto_jax.train.distributed import initialize
from read_spy import SpyHandle

RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("vocab", "tensor"), ("layers", None), ("head_dim", None))


def spy_on_reads() -> list:
    """[(tensor name, bytes)] of every safetensors read (whole tensors or slices) from now on."""
    log: list = []
    real = tensor_source.safe_open
    tensor_source.safe_open = lambda *a, **k: SpyHandle(real(*a, **k), log)
    return log


def bytes_by_tensor(log: list) -> dict:
    """{tensor name: bytes read} of a spy's log."""
    out: dict = {}
    for name, nbytes in log:
        out[name] = out.get(name, 0) + nbytes
    return out


def check_shards(got: jax.Array, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    for shard in got.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def main(path: str, out: str) -> None:
    assert initialize() and jax.process_count() == 2
    reads = spy_on_reads()
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    whole = load_file(f"{path}/model.safetensors")
    model, config = from_pretrained(path, mesh=mesh, rules=RULES)
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for row in table.param_table(config):
        shape = flat[row.path].shape
        if row.stacked:
            want = np.stack([table.to_ours(row.transform, whole[row.hf_name.format(i=i)], shape[1:])
                             for i in range(config.num_layers)])
        else:
            want = table.to_ours(row.transform, whole[row.hf_name], shape)
        check_shards(flat[row.path], want)
    loads = {"float32": bytes_by_tensor(reads)}
    for quantization in (Quantization("int8"), Quantization("nf4", double_quant=True)):
        reads.clear()
        base = load_quantized(path, quantization, mesh=mesh, rules=RULES)
        loads[quantization.scheme] = bytes_by_tensor(reads)
        for name, (row, n_in) in quantized_rows(base.config).items():
            got = base.layers[name]
            want = qz.stack([qz.quantize_weight(whole[row.hf_name.format(i=i)], got.shape, n_in, quantization.scheme,
                                                quantization.double_quant) for i in range(config.num_layers)])
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                check_shards(g, w)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(loads, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
