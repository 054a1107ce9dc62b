"""Quantised frozen weights for QLoRA: int8 per output channel, NF4 in blocks of 64.

Both forms are bitsandbytes' own, bit for bit, so a base quantised here holds the codes
a user of transformers' `BitsAndBytesConfig` gets for the same checkpoint:

int8 (`bitsandbytes.functional.int8_vectorwise_quant`, LLM.int8's weight format, no outliers):
    absmax[o] = max_i |W[o, i]|  (float32), per output channel o of the HF [out, in] weight
    q[o, i]   = round(W[o, i] * (127 / absmax[o]))  in [-127, 127]
    W ~ q * absmax * (1/127): off by at most half a step, absmax / 254

NF4 (`quantize_4bit(quant_type="nf4", blocksize=64)`, QLoRA's base):
    the HF tensor, flattened row-major, in blocks of 64 (a block never crosses a row: we
    require in % 64 == 0, which every supported checkpoint meets); absmax[b] = max |block b|
    (float32); each value times 1 / absmax[b] is replaced by the index of the nearest of the
    16 NF4 values (`NF4_CODE`, ties to the lower); two indices per byte, the first (lower
    flat index) in the high nibble.
    Double quantisation (`compress_statistics=True`): one tensor's float32 absmaxes, in
    their flat HF order, minus their mean (`offset`), quantised in blocks of 256 to the
    index of the nearest of bitsandbytes' 8-bit dynamic map (`DYNAMIC_CODE`), each block
    with its own float32 absmax: 8.1 instead of 32 bits per block of 64 values.

The stored layout is ours, not HF's: each HF array transposed, so the blocks run along our
input axes and every array keeps the weight's output axes (with their logical names, so
the sharding rules shard it like the weight; `quantized_axes`). For a weight of our shape
[*in, *out] (q_proj [D, H, hd], o_proj [H, hd, D], gate_proj [D, F]), in = prod(in axes):

    int8   codes  int8  [*in, *out]        bitsandbytes' CB [out, in], transposed
           absmax f32   [*out]             its SCB
    nf4    codes  uint8 [in/2, *out]       its packed bytes read as [out, in/2], transposed
           absmax f32   [in/64, *out]      its absmax read as [out, in/64], transposed
      or   DoubleQuant: codes uint8 [in/64, *out] (likewise), absmax f32 [ceil(out*in/64/256)]
           (flat, in bitsandbytes' order), offset f32 []

A stacked weight has a leading [L] on every array. Quantising runs on the host in numpy
(once, while loading: kto_jax/models/quantized_base.py, kto_jax/models/shard_read.py); `dequantize` is jnp and reads any
number of leading axes, so the layer scan dequantises one layer's slice in its body and
the whole model never exists in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kto_jax.errors import UserError

SCHEMES = ("int8", "nf4")
NF4_BLOCK = 64      # values per NF4 block (bitsandbytes' default blocksize)
STATS_BLOCK = 256   # absmaxes per double-quantisation block (bitsandbytes' nested blocksize)
INT8_MAX = 127
INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes dequantises int8 by this factor
_TINY = np.float32(1e-38)                   # bitsandbytes' floor under an all-zero block's absmax
_CHUNK = 1 << 22                            # values quantised at once (bounds the host's float32 copy)

# The 16 NF4 values (quantiles of N(0, 1) scaled to [-1, 1], QLoRA), as bitsandbytes lists them.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), float32 [256], sorted.

    For exponent level i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) times
    10^(i - 6), with both signs; then 0 and 1. Computed in float64 and rounded once;
    bitsandbytes rounds torch's float32 linspace first, so its table differs from this
    one by at most one float32 ulp in some entries (tests/models/test_quantize.py).
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2 ** i + 1)
        means = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        values += [*means, *-means]
    return np.sort(np.asarray(values, np.float64)).astype(np.float32)


DYNAMIC_CODE = dynamic_map()


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How the frozen base is stored: scheme "none", "int8" or "nf4"; `double_quant`
    quantises NF4's block absmaxes to 8 bits too (bitsandbytes' compress_statistics).
    Hashable: a field of ModelConfig (kto_jax/models/config.py)."""

    scheme: str = "none"
    double_quant: bool = False

    def __post_init__(self):
        if self.scheme not in ("none", *SCHEMES):
            raise UserError(f"base quantization {self.scheme!r}: choose none, {', '.join(SCHEMES)}")
        if self.double_quant and self.scheme != "nf4":
            raise UserError(f"double quantisation quantises NF4's block absmaxes; base quantization "
                            f"{self.scheme!r} has none: use nf4 or turn double quantisation off")

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    def describe(self) -> str:
        """"nf4 + double quantisation", "int8", "none": for log lines and tables."""
        return self.scheme + (" + double quantisation" if self.double_quant else "")


NO_QUANTIZATION = Quantization()


# ---- the stored forms (pytrees: the layer scan slices every array, the static fields stay) ----

@struct.dataclass
class Int8Weight:
    """An int8 weight in our layout; see the module docstring."""

    codes: Any    # int8 [..., *in, *out]
    absmax: Any   # float32 [..., *out]
    shape: tuple[int, ...] = struct.field(pytree_node=False)  # one layer's weight shape, ours
    n_in: int = struct.field(pytree_node=False)               # how many leading axes are inputs


@struct.dataclass
class DoubleQuant:
    """NF4 block absmaxes, 8-bit quantised in blocks of 256 of their flat HF order."""

    codes: Any    # uint8 [..., in/64, *out]: index into DYNAMIC_CODE
    absmax: Any   # float32 [..., ceil(out * in / 64 / 256)]
    offset: Any   # float32 [...]: the mean absmax, subtracted before quantising


@struct.dataclass
class Nf4Weight:
    """An NF4 weight in our layout; `absmax` is float32 [..., in/64, *out] or a DoubleQuant."""

    codes: Any    # uint8 [..., in/2, *out]: two NF4 indices per byte, the first in the high nibble
    absmax: Any
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False)


QuantizedWeight = Int8Weight | Nf4Weight


# ---- quantising (numpy, host; HF layout [out, in], as bitsandbytes) ----

def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [out, in], absmax float32 [out]) of an HF weight, as int8_vectorwise_quant.

    An all-zero row gets absmax 0 and codes 0 (bitsandbytes' codes are undefined there).
    """
    absmax = int8_absmax(weight)
    return int8_codes(weight, absmax), absmax


def int8_absmax(weight: np.ndarray) -> np.ndarray:
    """float32 [rows] max |W[o, i]| over the columns of an HF weight (or of a column slice of
    it: the max over slices is the max over the row, exactly)."""
    w = np.asarray(weight)
    absmax = np.empty(w.shape[0], np.float32)
    for rows in _row_slices(*w.shape):
        absmax[rows] = np.abs(w[rows].astype(np.float32)).max(axis=1, initial=np.float32(0))
    return absmax


def int8_codes(weight: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """int8 codes [rows, cols] of an HF weight (or a column slice of it) given each row's
    whole-row `absmax`: round(W * (127 / absmax)), elementwise, so a slice's codes are the
    whole weight's codes of that slice."""
    w = np.asarray(weight)
    codes = np.empty(w.shape, np.int8)
    for rows in _row_slices(*w.shape):
        a = absmax[rows]
        # bitsandbytes' 127.0 / absmax is torch's reciprocal(absmax) * 127: two roundings.
        factor = (np.float32(1) / np.where(a > 0, a, np.float32(1))) * np.float32(INT8_MAX)
        codes[rows] = np.round(w[rows].astype(np.float32) * factor[:, None]).astype(np.int8)
    return codes


def quantize_nf4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [out, in/2], absmax float32 [out, in/64]) of an HF weight [out, in]:
    bitsandbytes' `quantize_4bit(w, blocksize=64, quant_type="nf4")` buffers, reshaped.

    Raises ValueError when in is not a multiple of 64 (a block would cross a row).
    """
    w = np.asarray(weight)
    out_dim, in_dim = w.shape
    if in_dim % NF4_BLOCK:
        raise ValueError(f"NF4 needs the input size ({in_dim}) to be a multiple of {NF4_BLOCK}")
    packed = np.empty((out_dim, in_dim // 2), np.uint8)
    absmax = np.empty((out_dim, in_dim // NF4_BLOCK), np.float32)
    for rows in _row_slices(out_dim, in_dim):
        x = w[rows].astype(np.float32).reshape(-1, in_dim // NF4_BLOCK, NF4_BLOCK)
        a = np.maximum(x.max(axis=-1), -x.min(axis=-1))                # [r, in/64]
        x *= (np.float32(1) / np.maximum(a, _TINY))[..., None]
        idx = _nearest(np.clip(x, -1, 1, out=x), NF4_CODE).reshape(len(a), in_dim)  # [r, in]
        packed[rows] = (idx[:, 0::2] << 4) | idx[:, 1::2]
        absmax[rows] = a
    return packed, absmax


def quantize_blockwise(values: np.ndarray, code: np.ndarray = DYNAMIC_CODE,
                       blocksize: int = STATS_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [n], absmax float32 [ceil(n / blocksize)]) of flat `values`: each block
    scaled by 1 / its absmax and each value replaced by its nearest entry of `code` (ties to
    the lower), as bitsandbytes' `quantize_blockwise` (its CPU kernel looks the nearest up in
    a 65536-bin table and misses it for a few values in a thousand; its GPU kernel does not)."""
    x = np.asarray(values, np.float32).reshape(-1)
    blocks = -(-x.size // blocksize)
    padded = np.zeros(blocks * blocksize, np.float32)
    padded[:x.size] = np.abs(x)
    absmax = padded.reshape(blocks, blocksize).max(axis=1)
    inv = np.repeat(np.float32(1) / np.maximum(absmax, _TINY), blocksize)[:x.size]
    return _nearest(np.clip(x * inv, -1, 1), code), absmax


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(codes uint8 [n], absmax float32 [ceil(n / 256)], offset) of one tensor's NF4 block
    absmaxes in their flat HF order: `quantize_4bit(..., compress_statistics=True)`'s state.

    The offset is the mean rounded once to float32 (bitsandbytes' float32 torch mean may
    differ from it in the last place)."""
    flat = np.asarray(absmax, np.float32).reshape(-1)
    offset = np.float32(flat.mean(dtype=np.float64))
    codes, scales = quantize_blockwise(flat - offset)
    return codes, scales, offset


def quantize_weight(hf_weight: np.ndarray, shape: Sequence[int], n_in: int, scheme: str,
                    double_quant: bool = False) -> QuantizedWeight:
    """One layer's weight in our layout of `shape` (the first `n_in` axes inputs), quantised
    from its HF tensor [out, in] by `scheme` ("int8" or "nf4"; `double_quant`: NF4's absmaxes
    8-bit quantised too)."""
    shape = tuple(int(s) for s in shape)
    out_shape = shape[n_in:]

    def ours(hf: np.ndarray) -> np.ndarray:  # HF [out, k] -> ours [k, *out]
        return np.ascontiguousarray(hf.T).reshape(hf.shape[1], *out_shape)

    if scheme == "int8":
        codes, absmax = quantize_int8(hf_weight)
        return Int8Weight(ours(codes).reshape(shape), absmax.reshape(out_shape), shape=shape, n_in=n_in)
    if scheme != "nf4":
        raise ValueError(f"unknown quantisation scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    packed, absmax = quantize_nf4(hf_weight)
    scales = ours(absmax)
    if double_quant:
        codes, block_scales, offset = double_quantize(absmax)
        scales = DoubleQuant(ours(codes.reshape(absmax.shape)), block_scales, np.asarray(offset))
    return Nf4Weight(ours(packed), scales, shape=shape, n_in=n_in)


def stack(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Per-layer quantised weights (all of one form and shape) stacked along a leading [L]."""
    return jax.tree.map(lambda *xs: np.stack(xs), *weights)


def _nearest(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """uint8 index of the nearest entry of the sorted `code` (ties to the lower): the number
    of float32 midpoints below each value, as bitsandbytes' bucketize over them."""
    bounds = (code[:-1] + code[1:]) / np.float32(2)
    if len(bounds) > 15:  # the 8-bit map (absmaxes only: 1/64 of the values): a binary search
        return np.searchsorted(bounds, scaled, side="left").astype(np.uint8)
    idx = np.zeros(scaled.shape, np.uint8)
    for bound in bounds:  # NF4: 15 branch-free passes, 6x faster than searching random values
        idx += scaled > bound
    return idx


def _row_slices(rows: int, cols: int) -> list[slice]:
    step = max(1, _CHUNK // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


# ---- dequantising (jnp, jittable; any leading axes) ----

def dequantize(w: QuantizedWeight, dtype: Any) -> jax.Array:
    """The weight [..., *w.shape] in `dtype`, computed in float32 as bitsandbytes does and
    rounded once. Leading axes pass through: a stacked [L, ...] weight, or one layer's slice
    inside the layer scan."""
    if isinstance(w, Int8Weight):
        lead = w.codes.shape[:w.codes.ndim - len(w.shape)]
        absmax = w.absmax.reshape(*lead, *(1,) * w.n_in, *w.shape[w.n_in:])
        return (w.codes.astype(jnp.float32) * absmax * INV_127).astype(dtype)
    n_out = len(w.shape) - w.n_in
    axis = w.codes.ndim - n_out - 1                                   # the packed input axis
    lead, out = w.codes.shape[:axis], w.codes.shape[axis + 1:]
    idx = jnp.stack([w.codes >> 4, w.codes & 0xF], axis=axis + 1)     # [..., in/2, 2, *out]
    absmax = block_absmax(w.absmax, n_out)                            # [..., in/64, *out]
    idx = idx.reshape(*lead, absmax.shape[axis], NF4_BLOCK, *out)     # [..., in/64, 64, *out]
    values = jnp.asarray(NF4_CODE)[idx.astype(jnp.int32)] * jnp.expand_dims(absmax, axis + 1)
    return values.astype(dtype).reshape(*lead, *w.shape)


def block_absmax(absmax: Any, n_out: int) -> jax.Array:
    """float32 [..., in/64, *out] NF4 block absmaxes; a DoubleQuant is dequantised as
    bitsandbytes does: DYNAMIC_CODE[codes] * its block's absmax, then + offset."""
    if not isinstance(absmax, DoubleQuant):
        return absmax
    codes = absmax.codes
    axis = codes.ndim - n_out - 1
    per_layer = codes.shape[axis:]                                    # (in/64, *out)
    # Flat HF index of each absmax (HF holds them as [out, in/64]): o * in/64 + j.
    j = jax.lax.broadcasted_iota(jnp.int32, per_layer, 0)
    o = sum(jax.lax.broadcasted_iota(jnp.int32, per_layer, 1 + k) * math.prod(per_layer[2 + k:])
            for k in range(n_out))
    scales = jnp.take(absmax.absmax, (o * per_layer[0] + j) // STATS_BLOCK, axis=-1)  # [..., in/64, *out]
    offset = absmax.offset.reshape(*absmax.offset.shape, *(1,) * (1 + n_out))
    return jnp.asarray(DYNAMIC_CODE)[codes.astype(jnp.int32)] * scales + offset


def layer(w: QuantizedWeight, i: Any) -> QuantizedWeight:
    """Layer `i` (int or traced scalar) of a stacked weight, as the layer scan slices it."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), w)


# ---- shapes, logical axes, bytes (no data: abstract states, AOT compile, the fit table) ----

def abstract_weight(shape: Sequence[int], n_in: int, scheme: str, double_quant: bool = False,
                    lead: Sequence[int] = ()) -> QuantizedWeight:
    """The quantised form of a weight of our `shape` with jax.ShapeDtypeStruct leaves
    (`lead`: leading axes, e.g. (L,)); what `quantize_weight` returns, without data."""
    shape, lead = tuple(int(s) for s in shape), tuple(int(s) for s in lead)
    out = shape[n_in:]
    in_size = math.prod(shape[:n_in])

    def sds(dims: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(lead + dims, jnp.dtype(dtype))

    if scheme == "int8":
        return Int8Weight(sds(shape, jnp.int8), sds(out, jnp.float32), shape=shape, n_in=n_in)
    if scheme != "nf4":
        raise ValueError(f"unknown quantisation scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    blocks = (in_size // NF4_BLOCK, *out)
    absmax = sds(blocks, jnp.float32)
    if double_quant:
        stats = -(-math.prod(blocks) // STATS_BLOCK)
        absmax = DoubleQuant(sds(blocks, jnp.uint8), sds((stats,), jnp.float32), sds((), jnp.float32))
    return Nf4Weight(sds((in_size // 2, *out), jnp.uint8), absmax, shape=shape, n_in=n_in)


def quantized_axes(w: QuantizedWeight, axes: Sequence[str | None]) -> QuantizedWeight:
    """`w` with each array replaced by its logical axes, from the weight's `axes` (leading
    axes such as 'layers' included). Codes and absmaxes keep the output axes; NF4's packed
    and blocked input axis is named after the first input axis ('embed', o_proj's 'heads');
    a double quantisation's flat absmaxes and offset are replicated past the leading axes."""
    axes = tuple(axes)
    n_lead = len(axes) - len(w.shape)
    lead, inputs, out = axes[:n_lead], axes[n_lead:n_lead + w.n_in], axes[n_lead + w.n_in:]
    if isinstance(w, Int8Weight):
        return w.replace(codes=axes, absmax=lead + out)
    blocked = lead + inputs[:1] + out
    absmax = blocked
    if isinstance(w.absmax, DoubleQuant):
        absmax = DoubleQuant(blocked, lead + (None,), lead)
    return w.replace(codes=blocked, absmax=absmax)


def nbytes(w: QuantizedWeight) -> int:
    """Bytes of every array of `w` (concrete or abstract)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(w))
