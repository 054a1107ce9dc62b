"""Causal attention through the Pallas splash-attention kernel on TPUs.

Why: XLA's attention keeps the [B, H, T, T] probabilities of every layer alive for
the backward pass: 6 GiB per chip for two 1024-token rows of Llama-3.2-1B (f32 and
bf16 copies, 16 layers), the largest temporary of the KTO step on a TPU.
Splash attention is flash attention for TPUs: it keeps only O(T) statistics.

Scope: causal (optionally sliding-window) self-attention with NO padding mask,
which is exactly what the train step's forwards run (kto_jax/models/logprobs.py rotates
each row so its real tokens come first). Grouped-query attention is native.

On TPU the Mosaic kernel runs inside a `shard_map` over the ambient mesh (Mosaic
kernels cannot be partitioned automatically): rows split over the mesh's 'data'
and 'fsdp' axes, heads over 'tensor' when both head counts divide it. Lowered for
any other platform (the CPU tests) the same kernel runs in Pallas interpret mode,
so the numerics are testable anywhere, unless the caller passes a `fallback` (the
model's 'auto' passes XLA attention). `jax.lax.platform_dependent` picks per
lowering platform, so an AOT compile for a TPU slice on a CPU host (kto-jax
compile, kto-jax bench --topology) uses the real kernel, as the TPU itself would.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec

Array = jax.Array
BLOCK = 128  # the kernel's default block sizes: T must be a multiple


def supports(q: Array, k: Array) -> bool:
    """Whether the kernel takes q [B, T, H, hd], k [B, T, K, hd] (T a multiple of the block)."""
    return q.shape[1] % BLOCK == 0 and q.shape[1] == k.shape[1] and q.shape[2] % k.shape[2] == 0


def _kernel(num_heads: int, t: int, sliding_window: int | None, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
        splash_attention_kernel as sk, splash_attention_mask as sm)
    if sliding_window:
        head = sm.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
    else:
        head = sm.CausalMask((t, t))
    mask = sm.MultiHeadMask([head] * num_heads)
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                              interpret=interpret)


def _local(q: Array, k: Array, v: Array, *, sliding_window: int | None, softcap: float | None,
           interpret: bool) -> Array:
    """One shard: q [b, T, h, hd], k/v [b, T, kh, hd] (q pre-scaled) -> [b, T, h, hd]."""
    kernel = _kernel(q.shape[2], q.shape[1], sliding_window, softcap, interpret)
    out = jax.vmap(kernel)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
    return out.swapaxes(1, 2)


def _specs(q: Array, k: Array) -> tuple[PartitionSpec, PartitionSpec] | None:
    """(q spec, k/v spec) over the ambient mesh, or None when there is no mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rows = []
    for axis in ("data", "fsdp", "expert"):  # the batch axes of the default rules
        size = mesh.shape.get(axis, 1)
        if size > 1 and q.shape[0] % (math.prod(mesh.shape[a] for a in rows) * size) == 0:
            rows.append(axis)
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 else None
    batch = tuple(rows) if rows else None
    return (PartitionSpec(batch, None, heads, None),) * 2


def splash_attention(q: Array, k: Array, v: Array, *, scale: float,
                     sliding_window: int | None = None, softcap: float | None = None,
                     fallback: Callable[[Array, Array, Array], Array] | None = None) -> Array:
    """softmax(soft_cap(scale q k^T) + causal mask) v for q [B, T, H, hd], k and v [B, T, K, hd].

    Every query sees the keys at and before its own position (within the last
    `sliding_window` positions if given); there is no padding mask. `softcap` c caps
    the logits at c * tanh(s / c) (the kernel's attn_logits_soft_cap). Lowered for a
    TPU this is the Mosaic kernel; for any other platform, `fallback(q, k, v)` (the
    unscaled inputs) when given, else the same kernel in Pallas interpret mode.
    """
    def run(interpret: bool):
        def fn(q, k, v):
            q = q * jax.numpy.asarray(scale, q.dtype)
            return _local(q, k, v, sliding_window=sliding_window, softcap=softcap, interpret=interpret)
        return _sharded(fn, q, k, extra=0)

    return jax.lax.platform_dependent(q, k, v, tpu=run(False), default=fallback or run(True))


def _sharded(fn: Callable, q: Array, k: Array, *, extra: int) -> Callable:
    """fn itself without a mesh, else fn in a shard_map over the mesh's row and head axes;
    q, k, v come first, then `extra` int [B, ...] arrays split over rows only."""
    specs = _specs(q, k)
    if specs is None:
        return fn
    rows = PartitionSpec(specs[0][0])
    return jax.shard_map(fn, in_specs=(specs[0], specs[1], specs[1]) + (rows,) * extra,
                         out_specs=specs[0], check_vma=False)


def _packed_kernel(num_heads: int, t: int, sliding_window: int | None, softcap: float | None,
                   interpret: bool):
    """The kernel over T queries and 2T keys [K2 | K] (kto_jax/models/packed_attention.py):
    K causal (q >= k), K2 seen up to column q + T (copies sit before their readers), both
    within the window when there is one (K2's copies are column-aligned with positions)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
        splash_attention_kernel as sk, splash_attention_mask as sm)
    shape = (t, 2 * t)
    if sliding_window:
        window = (sliding_window - 1, 0)
        head = sm.LogicalOr(sm.LocalMask(shape, window_size=window, offset=t),
                            sm.LocalMask(shape, window_size=window, offset=0))
    else:
        head = sm.CausalMask(shape, offset=t)
    mask = sm.MultiHeadMask([head] * num_heads)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                                interpret=interpret)
    return lambda q, k, v, q_ids, kv_ids: kernel(q, k, v, segment_ids=sk.SegmentIds(q_ids, kv_ids))


def splash_packed_attention(q: Array, k: Array, v: Array, q_ids: Array, kv_ids: Array,
                            copy_source: Array, *, scale: float,
                            sliding_window: int | None = None, softcap: float | None = None,
                            fallback: Callable[[Array, Array, Array], Array] | None = None
                            ) -> Array:
    """Attention of packed [x | y | y2] rows through the splash kernel's segment ids.

    q [B, T, H, hd], k and v [B, T, K, hd]; q_ids, kv_ids, copy_source from
    `kto_jax.models.packed_attention.splash_key_layout` (the doubled keys [K2 | K]).
    Lowered for a TPU: the Mosaic kernel; elsewhere `fallback(q, k, v)` when given,
    else the kernel in Pallas interpret mode.
    """
    def run(interpret: bool):
        def fn(q, k, v, q_ids, kv_ids, copy_source):
            q = q * jax.numpy.asarray(scale, q.dtype)
            src = copy_source[:, :, None, None]
            k = jax.numpy.concatenate([jax.numpy.take_along_axis(k, src, axis=1), k], axis=1)
            v = jax.numpy.concatenate([jax.numpy.take_along_axis(v, src, axis=1), v], axis=1)
            kernel = _packed_kernel(q.shape[2], q.shape[1], sliding_window, softcap, interpret)
            out = jax.vmap(kernel)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
                                   q_ids, kv_ids)
            return out.swapaxes(1, 2)
        return _sharded(fn, q, k, extra=3)

    default = run(True) if fallback is None else (lambda q, k, v, *_: fallback(q, k, v))
    return jax.lax.platform_dependent(q, k, v, q_ids, kv_ids, copy_source, tpu=run(False),
                                      default=default)


def splash_segment_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, scale: float,
                             sliding_window: int | None = None, softcap: float | None = None,
                             fallback: Callable[[Array, Array, Array], Array] | None = None
                             ) -> Array:
    """Causal attention of packed rows of contiguous segments (no tree: the main rows of the
    kl-stream layout, kto_jax/models/packed_attention.py): a query sees the keys of its own
    segment id at or before it, within the window (columns = positions in a segment).

    q [B, T, H, hd], k and v [B, T, K, hd], segment_ids int32 [B, T] (0 on padding, which
    then sees padding). Lowered for a TPU: the Mosaic kernel; elsewhere `fallback(q, k, v)`
    when given, else the kernel in Pallas interpret mode.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
        splash_attention_kernel as sk)

    def run(interpret: bool):
        def fn(q, k, v, seg):
            q = q * jax.numpy.asarray(scale, q.dtype)
            kernel = _kernel(q.shape[2], q.shape[1], sliding_window, softcap, interpret)
            out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
                q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), seg)
            return out.swapaxes(1, 2)
        return _sharded(fn, q, k, extra=1)

    default = run(True) if fallback is None else (lambda q, k, v, *_: fallback(q, k, v))
    return jax.lax.platform_dependent(q, k, v, segment_ids, tpu=run(False), default=default)
