"""Each process reads from safetensors only the slices its devices hold: the loaded params
(float, int8, NF4, NF4 + double quantisation) are bit for bit what reading every tensor whole
gives, and the bytes read per tensor are each device block's, not the tensor's."""

import collections
import json
import math
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers
from cli_runs import REPO, cli_env
from read_spy import SpyHandle
from flax import nnx
from tiny_models import hf_model

from kto_jax import sharding as shd
from kto_jax.models import from_pretrained, shard_read
from kto_jax.models import params as table
from kto_jax.models import tensor_source
from kto_jax.models.hf_io import load_from_source, read_hf_config
from kto_jax.models.quantized_base import Quantization, load_quantized, load_quantized_from_source, quantized_rows
from kto_jax.models.tensor_source import SafetensorsSource

RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("vocab", "tensor"), ("layers", None), ("head_dim", None))
# head_dim sharded too: q_proj's HF rows (head, head_dim) are cut inside each head.
HEAD_DIM_RULES = (("embed", "fsdp"), ("head_dim", "tensor"), ("vocab", "tensor"))
MESHES = {"fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2}, "fsdp8": {"data": 1, "fsdp": 8},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
SCHEMES = [Quantization("int8"), Quantization("nf4"), Quantization("nf4", double_quant=True)]


def _write(path, dtype="float32", **sizes):
    """A random Qwen2 (q/k/v biases, untied lm_head, GQA) of `sizes`, saved in `dtype`."""
    import torch
    config = transformers.Qwen2Config(**{
        "vocab_size": 256, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, **sizes})
    hf_model(config).to(getattr(torch, dtype)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """'aligned': D = F = H * hd = 256, so on fsdp 4 x tensor 2 every NF4 shard is whole blocks;
    'small': D 64 (one NF4 block per row: the codes shards cut blocks); 'bf16': stored bfloat16."""
    root = tmp_path_factory.mktemp("shard_read")
    return {"aligned": _write(root / "aligned"), "bf16": _write(root / "bf16", "bfloat16"),
            "small": _write(root / "small", hidden_size=64, intermediate_size=128)}


class WholeTensors:
    """A TensorSource that reads tensors whole only: the loader's path before slicing."""

    def __init__(self, path):
        self.source = SafetensorsSource(path)

    def names(self):
        return self.source.names()

    def get(self, name):
        return self.source.get(name)


@pytest.fixture
def reads(monkeypatch):
    """The (name, bytes) of every safetensors read while the test runs."""
    log = []
    real = tensor_source.safe_open
    monkeypatch.setattr(tensor_source, "safe_open", lambda *a, **k: SpyHandle(real(*a, **k), log))
    return log


def _flat(model):
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same(got, want):
    """Same values, bit for bit, on the same shardings (every leaf of two pytrees)."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.sharding == w.sharding and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _block_bytes(x, lead, itemsize, unit=1):
    """{HF tensor slot: [bytes of each distinct device block's slice of it]} of array `x`
    whose first `lead` axes pick the HF tensor (unit: checkpoint values per element)."""
    out = collections.defaultdict(list)
    blocks = {tuple(s.indices(n)[:2] for s, n in zip(index, x.shape))
              for index in x.sharding.addressable_devices_indices_map(x.shape).values()}
    for b in blocks:
        size = math.prod(hi - lo for lo, hi in b[lead:]) * itemsize * unit
        for slot in np.ndindex(*[hi - lo for lo, hi in b[:lead]]):
            out[tuple(lo + s for (lo, _), s in zip(b[:lead], slot))].append(size)
    return out


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_float_load_equals_whole_tensor_load_and_reads_only_the_blocks(checkpoints, reads, mesh_name):
    path = checkpoints["aligned"]
    mesh = shd.make_mesh(MESHES[mesh_name])
    model, config = from_pretrained(path, mesh=mesh, rules=RULES)
    sliced = list(reads)
    reads.clear()
    today, _ = load_from_source(read_hf_config(path), WholeTensors(path), mesh=mesh, rules=RULES)
    _assert_same(_flat(model), _flat(today))
    source = SafetensorsSource(path)
    whole = sorted((n, source.nbytes(n)) for n in source.names())
    assert sorted(reads) == whole                           # before: every tensor read whole
    assert sum(b for _, b in sliced) == sum(b for _, b in whole)  # now: every byte once, in slices
    # What slicing read: per HF tensor, each distinct device block's bytes, once.
    want = collections.Counter()
    flat = _flat(model)
    for row in table.param_table(config):
        lead = (2 if row.per_expert else 1) if row.stacked else 0
        names = list(row.hf_names(config.num_layers, config.num_experts)) if row.stacked else [row.hf_name]
        for slot, sizes in _block_bytes(flat[row.path], lead, 4).items():
            name = names[int(np.ravel_multi_index(slot, flat[row.path].shape[:lead]))] if lead else names[0]
            want.update((name, s) for s in sizes)
    assert collections.Counter(sliced) == want
    q = "model.layers.0.self_attn.q_proj.weight"  # [H * hd, D]: its fsdp x tensor block only
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    assert {b for n, b in sliced if n == q} == {256 * 256 * 4 // shards}


def test_head_dim_sharded_and_bf16_checkpoints_load_as_whole_tensors_do(checkpoints, reads):
    mesh = shd.make_mesh(MESHES["fsdp4_tensor2"])
    for path, rules, dtype in ((checkpoints["aligned"], HEAD_DIM_RULES, "float32"),
                               (checkpoints["bf16"], RULES, "bfloat16"), (checkpoints["bf16"], RULES, "float32")):
        model, _ = from_pretrained(path, mesh=mesh, rules=rules, param_dtype=dtype)
        today, _ = load_from_source(read_hf_config(path), WholeTensors(path), mesh=mesh, rules=rules,
                                    param_dtype=dtype)
        _assert_same(_flat(model), _flat(today))
    assert model.layers.q_proj[...].sharding.spec == shd.logical_to_mesh(
        ("layers", "embed", "heads", "head_dim"), RULES, model.layers.q_proj[...].shape, mesh)


@pytest.mark.parametrize("quantization", SCHEMES, ids=lambda q: q.scheme + ("_double" if q.double_quant else ""))
@pytest.mark.parametrize("case", ["aligned", "small"])
def test_quantised_load_equals_whole_tensor_quantiser(checkpoints, reads, quantization, case):
    """Each codes shard quantised from its slice (NF4: widened to whole blocks) with the whole
    tensor's absmaxes is the whole-tensor quantiser's, bit for bit, scales included."""
    path = checkpoints[case]
    mesh = shd.make_mesh(MESHES["fsdp4_tensor2"])
    base = load_quantized(path, quantization, mesh=mesh, rules=RULES)
    sliced = list(reads)
    today = load_quantized_from_source(read_hf_config(path), WholeTensors(path), quantization, mesh=mesh,
                                       rules=RULES)
    _assert_same(base.layers, today.layers)
    _assert_same(base.params, today.params)
    assert not [n for n, b in sliced if b == SafetensorsSource(path).nbytes(n) and ".layers." in n
                and n.endswith("proj.weight")]  # no projection was read whole
    if case == "aligned" or quantization.scheme == "int8":
        # Each projection's reads are its codes blocks' slices: the weight's shard, per layer.
        unit = 2 if quantization.scheme == "nf4" else 1
        for name, (row, _) in quantized_rows(base.config).items():
            for (layer,), sizes in _block_bytes(base.layers[name].codes, 1, 4, unit).items():
                hf = row.hf_name.format(i=layer)
                assert sorted(b for n, b in sliced if n == hf) == sorted(sizes), hf


def test_quantised_shards_are_bitwise_with_head_dim_sharded(checkpoints):
    path = checkpoints["aligned"]
    mesh = shd.make_mesh(MESHES["fsdp4_tensor2"])
    for quantization in (Quantization("int8"), Quantization("nf4", double_quant=True)):
        base = load_quantized(path, quantization, mesh=mesh, rules=HEAD_DIM_RULES)
        today = load_quantized_from_source(read_hf_config(path), WholeTensors(path), quantization, mesh=mesh,
                                           rules=HEAD_DIM_RULES)
        _assert_same(base.layers, today.layers)


def test_layout_round_trips_every_transform():
    """hf_request + to_block of any block equals to_ours of the whole tensor, sliced."""
    rng = np.random.default_rng(0)
    for transform, shape in ((table.IDENTITY, (6, 4)), (table.LINEAR, (6, 4)), (table.HEADS_IN, (8, 2, 4)),
                             (table.HEADS_OUT, (2, 4, 8)), (table.HEADS_BIAS, (2, 4))):
        hf = rng.standard_normal(table.hf_shape(transform, shape)).astype(np.float32)
        ours = table.to_ours(transform, hf, shape)
        groups = shard_read.layout(transform, len(shape))
        for _ in range(20):
            bounds = tuple(tuple(sorted(rng.choice(n + 1, 2, replace=False))) for n in shape)
            cover, picks = shard_read.hf_request(groups, shape, bounds)
            got = shard_read.to_block(hf[cover], groups, bounds, picks)
            np.testing.assert_array_equal(got, ours[tuple(slice(*b) for b in bounds)])


@pytest.mark.slow  # two processes, three loads each: ~40 s on 2 busy cores
def test_two_processes_each_read_half_of_every_fsdp_sharded_tensor(checkpoints, tmp_path, compile_cache):
    """fsdp 2 (one process each) x tensor 2: every tensor with an embed axis is read half by
    each process; the q/k/v biases (heads on tensor, inside a process) whole by both. The
    worker checks each process's shards, float and quantised, against the whole tensors."""
    path = checkpoints["aligned"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = f"{REPO}/tests/models/two_process_load.py"
    procs = [subprocess.Popen([sys.executable, worker, path, str(tmp_path / f"{rank}.json")], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=cli_env(compile_cache, devices=2, KTO_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                          KTO_JAX_NUM_PROCESSES="2", KTO_JAX_PROCESS_ID=str(rank)))
             for rank in range(2)]
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"process {rank}: {err[-3000:]}"
    source = SafetensorsSource(path)
    for rank in range(2):
        loads = json.loads((tmp_path / f"{rank}.json").read_text())
        for load, reads in loads.items():
            assert set(reads) == source.names(), load
            for name, got in reads.items():
                size = source.nbytes(name)
                assert got == (size if name.endswith("bias") else size // 2), (rank, load, name)


def test_bucket_reader_slices_by_ranged_reads_of_whole_rows(checkpoints):
    """The gs:// reader's slices (one ranged read of the rows) equal safetensors' own."""
    path = f"{checkpoints['bf16']}/model.safetensors"
    ranged, local = tensor_source._RangedSafetensors(path), tensor_source.safe_open(path, framework="numpy")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        shape = local.get_slice(name).get_shape()
        for index in ((slice(0, 2),), tuple(slice(1, n // 2) for n in shape), tuple(slice(n // 3, n) for n in shape)):
            got, want = ranged.get_slice(name)[index], local.get_slice(name)[index]
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


def test_float_load_holds_one_device_block_at_a_time(tmp_path, monkeypatch):
    """Host arrays (tracemalloc: numpy's buffers and Python's) at their peak during an 8-way
    fsdp load: sliced, a few device blocks (gate_proj's [4, 64, 2048] float32 is 2 MiB; jax's
    device puts hold some), under one stacked gate_proj (16 MiB); reading whole tensors, the
    whole stacked parameter and more (measured 8.8 against 42 MB). Device puts copy here
    (may_alias=False), so a CPU device array that would alias its host block is not counted
    as the loader's."""
    import functools
    import tracemalloc
    path = _write(tmp_path / "wide", hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4)
    mesh = shd.make_mesh(MESHES["fsdp8"])
    monkeypatch.setattr(jax, "device_put", functools.partial(jax.device_put, may_alias=False))
    stacked = 4 * 512 * 2048 * 4
    peaks = {}
    for name, source in (("sliced", SafetensorsSource(path)), ("whole", WholeTensors(path))):
        tracemalloc.start()
        try:
            model, _ = load_from_source(read_hf_config(path), source, mesh=mesh, rules=RULES)
            jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        del model
    assert peaks["whole"] >= 2 * stacked and peaks["sliced"] < stacked, peaks
