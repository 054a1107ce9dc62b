"""Each device's shard of a parameter, read straight from the checkpoint: only its bytes.

A parameter's NamedSharding says which block of our array each device holds
(`sharding.addressable_devices_indices_map(shape)`). Our array is the HF tensor (one per
layer, and per expert, for the stacked layer weights) in another layout: each HF axis is a
group of our axes, flattened row-major (`layout`; q_proj's HF rows are our (heads, head_dim)
axes, its columns our embed axis). So a device's block comes from one rectangle of each HF
tensor it spans (`hf_request`), which a slicing source (`tensor_source.SafetensorsSource`:
`safe_open(...).get_slice(name)[...]`) reads without touching the rest of the file; the
rectangle is rearranged into our layout (`to_block`), cast, and put on the device, and
`jax.make_array_from_single_device_arrays` joins the pieces. Each process reads only what
its own devices hold; a block two devices share (a replicated axis) is read once.

A quantised projection (QLoRA, kto_jax/models/quantize.py) is read the same way, one layer
at a time: the rectangles of the layer that this process's codes shards need are read (an
NF4 rectangle widened to whole blocks of 64 inputs, so no block straddles it) and
quantised with the whole tensor's statistics, giving exactly the codes and scales
`quantize.quantize_weight` gives for the whole tensor. The statistics are exact maxima: an
int8 output channel's absmax is the max over its rectangles, NF4's block absmaxes are each
within one rectangle; when the run spans processes each process contributes the maxima of
its rectangles and they are max-reduced across processes (one small all-gather per layer
and weight), so that double quantisation, which needs every block absmax of the tensor
(their mean and blocks of 256), sees the same numbers everywhere.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from kto_jax.errors import UserError
from kto_jax.models import params as table
from kto_jax.models import quantize as qz
from kto_jax.models.config import ModelConfig
from kto_jax.models.tensor_source import TensorSource, read_slices

Bounds = tuple[tuple[int, int], ...]  # [start, stop) per axis of an array
Groups = tuple[tuple[int, ...], ...]  # per HF axis: the our-axes it flattens, row-major


def layout(transform: str, ndim: int) -> Groups:
    """Which of our (per-layer) axes each HF axis is made of (`params.to_ours`, read as groups)."""
    if transform == table.IDENTITY:
        return tuple((k,) for k in range(ndim))
    if transform in (table.LINEAR, table.EXPERT_LINEAR):
        return ((1,), (0,))
    if transform == table.HEADS_IN:   # ours [d, n, hd], HF [n * hd, d]
        return ((1, 2), (0,))
    if transform == table.HEADS_OUT:  # ours [h, hd, d], HF [d, h * hd]
        return ((2,), (0, 1))
    if transform == table.HEADS_BIAS:
        return (tuple(range(ndim)),)
    raise ValueError(f"unknown transform {transform!r}")


def hf_request(groups: Groups, shape: Sequence[int], bounds: Bounds) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """(the HF slice that covers our block `bounds` of an array of our `shape`, and per HF
    axis the flat positions within that slice of the block's elements, row-major)."""
    cover, picks = [], []
    for group in groups:
        ranges = [np.arange(*bounds[a]) for a in group]
        flat = np.ravel_multi_index(np.meshgrid(*ranges, indexing="ij"), [shape[a] for a in group]).reshape(-1)
        lo = int(flat[0]) if flat.size else 0
        cover.append(slice(lo, int(flat[-1]) + 1 if flat.size else 0))
        picks.append(flat - lo)
    return tuple(cover), picks


def to_block(hf_block: np.ndarray, groups: Groups, bounds: Bounds, picks: list[np.ndarray]) -> np.ndarray:
    """Our block `bounds` from the HF slice `hf_request` asked for it."""
    x = hf_block
    for k, pick in enumerate(picks):
        if not (len(pick) == x.shape[k] and (len(pick) == 0 or pick[-1] == len(pick) - 1)):
            x = np.take(x, pick, axis=k)  # only when an inner axis of a group is cut (head_dim sharded)
    order = [a for group in groups for a in group]
    x = x.reshape([bounds[a][1] - bounds[a][0] for a in order])
    return np.transpose(x, np.argsort(order)) if order != sorted(order) else x


def device_blocks(sharding: Sharding, shape: tuple[int, ...]) -> dict[Bounds, list[jax.Device]]:
    """{block bounds: this process's devices holding that block} of an array on `sharding`."""
    blocks: dict[Bounds, list[jax.Device]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        blocks.setdefault(bounds, []).append(device)
    return blocks


def check_shape(name: str, got: Sequence[int], want: Sequence[int]) -> None:
    if tuple(got) != tuple(want):
        raise UserError(f"tensor {name!r} has shape {tuple(got)} but the config (config.json) implies {tuple(want)}")


def assemble(shape: tuple[int, ...], sharding: Sharding, pieces: dict[Bounds, np.ndarray],
             blocks: dict[Bounds, list[jax.Device]]) -> jax.Array:
    """The global array from this process's host blocks, each put on the devices that hold it."""
    arrays = [jax.device_put(pieces[b], d) for b, devices in blocks.items() for d in devices]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


# ---- float parameters ----

def read_sharded(row: table.ParamRow, source: TensorSource, shape: tuple[int, ...], sharding: Sharding,
                 config: ModelConfig) -> jax.Array:
    """Our parameter of `row` on `sharding`, each block read from its HF rectangles only,
    one device block at a time (the host holds one block, in `param_dtype`)."""
    target = np.dtype(jnp.dtype(config.param_dtype))
    lead = (2 if row.per_expert else 1) if row.stacked else 0  # leading axes one HF tensor spans
    names = (list(row.hf_names(config.num_layers, config.num_experts, config.stack_layers(row.path[-1])))
             if row.stacked else [row.hf_name])
    want = table.hf_shape(row.transform, shape[lead:])
    for name in names:
        check_shape(name, source.shape(name), want)
    groups = layout(row.transform, len(shape) - lead)
    blocks = device_blocks(sharding, shape)
    arrays = []
    for bounds, devices in blocks.items():
        block = np.empty([b - a for a, b in bounds], target)
        cover, picks = hf_request(groups, shape[lead:], bounds[lead:])
        for slot in itertools.product(*(range(*b) for b in bounds[:lead])):
            name = names[int(np.ravel_multi_index(slot, shape[:lead]))] if lead else names[0]
            (piece,) = read_slices(source, name, [cover])
            block[tuple(s - b[0] for s, b in zip(slot, bounds))] = to_block(piece, groups, bounds[lead:], picks)
        arrays += [jax.device_put(block, d) for d in devices]
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


# ---- quantised projections ----

def read_quantized_sharded(row: table.ParamRow, n_in: int, source: TensorSource, abstract: qz.QuantizedWeight,
                           shardings: qz.QuantizedWeight, config: ModelConfig,
                           quantization: qz.Quantization) -> qz.QuantizedWeight:
    """The stacked quantised weight of `row` ([L, ...] leaves as `abstract`, each on its sharding
    in `shardings`), read and quantised one layer at a time, each process its shards only."""
    shape = abstract.shape                         # one layer's weight, ours
    n_out = len(shape) - n_in
    out_size, in_size = math.prod(shape[n_in:]), math.prod(shape[:n_in])
    names = list(row.hf_names(config.num_layers))
    for name in names:
        check_shape(name, source.shape(name), (out_size, in_size))
    nf4 = quantization.scheme == "nf4"
    unit, align = (2, qz.NF4_BLOCK) if nf4 else (1, 1)
    weight_groups = layout(row.transform, len(shape))
    # Per leaf: its groups over the per-layer leaf axes (HF leaf [out, in / unit] or [out, in / 64]).
    codes_groups = (tuple(range(1, 1 + n_out)), (0,)) if nf4 else weight_groups
    stats_groups = (tuple(range(1, 1 + n_out)), (0,)) if nf4 else (tuple(range(n_out)),)
    leaves, treedef = jax.tree.flatten(abstract)
    leaf_shardings = jax.tree.leaves(shardings)
    blocks = [device_blocks(s, tuple(x.shape)) for s, x in zip(leaf_shardings, leaves)]
    pieces = [{b: np.empty([hi - lo for lo, hi in b], x.dtype) for b in bl} for bl, x in zip(blocks, leaves)]
    for i, name in enumerate(names):
        codes_rects = {}  # device block of the codes -> (its HF cover in leaf units, weight rectangle to read)
        for bounds in blocks[0]:
            if bounds[0][0] <= i < bounds[0][1]:
                cover, picks = hf_request(codes_groups, leaves[0].shape[1:], bounds[1:])
                rect = (cover[0], slice(cover[1].start * unit // align * align,
                                        -(-cover[1].stop * unit // align) * align))
                codes_rects[bounds] = (cover, picks, rect)
        rects = sorted({(r[0].start, r[0].stop, r[1].start, r[1].stop) for _, _, r in codes_rects.values()})
        data = dict(zip(rects, read_slices(source, name, [(slice(a, b), slice(c, d)) for a, b, c, d in rects])))
        stats, codes = _quantize_rects(data, out_size, in_size, nf4)
        layer_stats = _layer_stats(stats, nf4, quantization.double_quant)
        for bounds, (cover, picks, rect) in codes_rects.items():
            key = (rect[0].start, rect[0].stop, rect[1].start, rect[1].stop)
            c0 = cover[1].start - rect[1].start // unit
            part = codes[key][:, c0:c0 + cover[1].stop - cover[1].start]
            pieces[0][bounds][i - bounds[0][0]] = to_block(part, codes_groups, bounds[1:], picks)
        for k in range(1, len(leaves)):
            value, groups = layer_stats[k - 1]
            for bounds in blocks[k]:
                if bounds[0][0] <= i < bounds[0][1]:
                    groups = groups if groups is not None else stats_groups
                    cover, picks = hf_request(groups, leaves[k].shape[1:], bounds[1:])
                    pieces[k][bounds][i - bounds[0][0]] = to_block(value[cover], groups, bounds[1:], picks)
        del data, codes
    arrays = [assemble(tuple(x.shape), s, p, bl) for x, s, p, bl in zip(leaves, leaf_shardings, pieces, blocks)]
    return jax.tree.unflatten(treedef, arrays)


def _quantize_rects(data: dict, out_size: int, in_size: int, nf4: bool) -> tuple[np.ndarray, dict]:
    """(the whole tensor's statistics, {rect: its codes in HF layout}) from the rectangles read:
    int8 absmax [out] per output channel, NF4 absmax [out, in / 64] per block; exact maxima,
    so the max over rectangles (and processes) is the whole tensor's."""
    stats = np.zeros((out_size, in_size // qz.NF4_BLOCK) if nf4 else (out_size,), np.float32)
    codes = {}
    for (r0, r1, c0, c1), x in data.items():
        if nf4:
            codes[(r0, r1, c0, c1)], stats[r0:r1, c0 // qz.NF4_BLOCK:c1 // qz.NF4_BLOCK] = qz.quantize_nf4(x)
        else:
            np.maximum(stats[r0:r1], qz.int8_absmax(x), out=stats[r0:r1])
    stats = _max_over_processes(stats)
    if not nf4:
        codes = {(r0, r1, c0, c1): qz.int8_codes(x, stats[r0:r1]) for (r0, r1, c0, c1), x in data.items()}
    return stats, codes


def _layer_stats(stats: np.ndarray, nf4: bool, double_quant: bool) -> list[tuple[np.ndarray, Groups | None]]:
    """The scale leaves of one layer in HF order, after the codes leaf: (value, groups or None
    for the leaf's own stats layout); a double quantisation's flat scales and offset as they are."""
    if not double_quant:
        return [(stats, None)]
    codes, scales, offset = qz.double_quantize(stats)
    return [(codes.reshape(stats.shape), None), (scales, ((0,),)), (np.asarray(offset), ())]


def _max_over_processes(x: np.ndarray) -> np.ndarray:
    """Elementwise max of `x` over all processes (`x` itself in a one-process run)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x)).max(axis=0)
