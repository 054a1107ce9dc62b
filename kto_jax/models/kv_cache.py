"""The KV cache of generation: every global layer's keys and values for all S slots, and each
sliding-window layer's for its last W slots only (a ring).

A cache has S slots, one per token position of the rows being generated (a left-padded
prompt, then one slot per new token). A global layer needs every slot; a sliding layer
with window W < S needs only the last W, so its keys and values live in a ring of W
slots, slot s at s mod W (Gemma 3 27B at 8k slots: 52 of its 62 layers keep 1024 slots,
a sixth of the cache). The two kinds are two stacks, `k`/`v` [Lg(+1), B, S, K, hd] and
`ring_k`/`ring_v` [Ls(+1), B, W, K, hd], each layer writing into its own; when a model has
both kinds each stack has one extra scratch layer that the other kind's layers write
into, so the layer scan writes unconditionally (no branch around an in-place update).
A model whose layers are all of one kind has one stack and no scratch.

Which slot a ring position holds follows from the write position alone: before slots
[index, index + T) are written, ring position r holds slot index - 1 - ((index - 1 - r)
mod W) (none when negative). Queries of a ring layer attend to the ring as it was plus
the new tokens (`ring_attention_mask`), then the new tokens are written, so a prompt
longer than W is prefilled in one pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
KV_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # logical axes of the k/v stacks
MASK_AXES = ("batch", "length")


class KVCache(NamedTuple):
    """Keys and values for S slots; slot order is the token order.

    k, v: [Lg, B, S, K, hd] in the compute dtype (RoPE already applied to k): the global
      layers (every layer when no layer has a window shorter than S), plus a scratch layer
      when there are ring layers too.
    mask: bool [B, S], True on slots that hold a real token (False: padding or unwritten).
    ring_k, ring_v: [Ls, B, W, K, hd] the sliding layers whose window W < S (plus a scratch
      layer when there are global layers), slot s at position s mod W; None when there are none.
    """
    k: Array | None
    v: Array | None
    mask: Array
    ring_k: Array | None = None
    ring_v: Array | None = None


class CacheLayout(NamedTuple):
    """Where each layer's keys and values live (static: from the config and S)."""
    window: int | None            # W of the ring layers; None: no ring
    global_index: tuple[int, ...]  # per layer, its layer in k/v (the scratch for ring layers)
    ring_index: tuple[int, ...]    # per layer, its layer in ring_k/ring_v (the scratch for the others)
    num_global: int               # layers of k/v, scratch included (0: no k/v)
    num_ring: int                 # layers of ring_k/ring_v, scratch included (0: no ring)


def cache_layout(config: Any, length: int) -> CacheLayout:
    """The stacks of a `length`-slot cache for `config` (a ModelConfig)."""
    kinds, kind_ids = config.layer_kinds()
    ring = [bool(kinds[k].window) and kinds[k].window < length for k in kind_ids]
    windows = {kinds[k].window for k, r in zip(kind_ids, ring) if r}
    assert len(windows) <= 1, "one sliding window per model"  # every family has one (sliding_window)
    n_ring, n_global = sum(ring), len(ring) - sum(ring)
    scratch = int(0 < n_ring < len(ring))
    global_index, ring_index, g, r = [], [], 0, 0
    for is_ring in ring:
        global_index.append(n_global if is_ring else g)
        ring_index.append(r if is_ring else n_ring)
        g, r = g + (not is_ring), r + is_ring
    return CacheLayout(windows.pop() if windows else None, tuple(global_index), tuple(ring_index),
                       n_global + scratch if n_global else 0, n_ring + scratch if n_ring else 0)


def init_kv_cache(config: Any, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots for `batch` rows, in the compute dtype."""
    layout = cache_layout(config, length)
    dtype = jnp.dtype(config.dtype)

    def stack(layers: int, slots: int) -> Array | None:
        shape = (layers, batch, slots, config.num_kv_heads, config.head_dim)
        return jnp.zeros(shape, dtype) if layers else None

    return KVCache(stack(layout.num_global, length), stack(layout.num_global, length),
                   jnp.zeros((batch, length), bool), stack(layout.num_ring, layout.window or 0),
                   stack(layout.num_ring, layout.window or 0))


def write_kv_cache(k_all: Array, v_all: Array, k: Array, v: Array, layer: Array,
                   index: Array) -> tuple[Array, Array]:
    """k_all, v_all [L, B, S, K, hd] with layer `layer`'s slots [index, index + T) set to
    k, v [B, T, K, hd] (in place inside the scan carry)."""
    start = (layer, 0, index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
    return k_all, v_all


def write_ring(ring_k: Array, ring_v: Array, k: Array, v: Array, layer: Array,
               index: Array) -> tuple[Array, Array]:
    """The ring stacks [L, B, W, K, hd] with the last min(T, W) of the new k, v [B, T, K, hd]
    (slots index .. index + T - 1) written at their positions slot mod W of layer `layer`."""
    w, t = ring_k.shape[2], k.shape[1]
    m = min(t, w)
    positions = (index + t - m + jnp.arange(m)) % w                      # [m], distinct
    k_new = k[:, t - m:].swapaxes(0, 1).astype(ring_k.dtype)             # [m, B, K, hd]
    v_new = v[:, t - m:].swapaxes(0, 1).astype(ring_v.dtype)
    return ring_k.at[layer, :, positions].set(k_new), ring_v.at[layer, :, positions].set(v_new)


def cached_attention_mask(kv_mask: Array, index: Array, num_new: int,
                          sliding_window: int | None) -> Array:
    """bool [B, 1, T, S]: the new token at slot index + t sees slot s iff s <= index + t
    and s holds a real token (or s is the query itself, so padded queries see something),
    and, with a sliding window W, s > index + t - W.
    """
    query = index + jnp.arange(num_new)[:, None]          # [T, 1] slot of each new token
    key = jnp.arange(kv_mask.shape[1])[None, :]           # [1, S]
    causal = key <= query
    if sliding_window:
        causal &= key > query - sliding_window
    visible = kv_mask[:, None, None, :] | (key == query)[None, None]
    return visible & causal[None, None]


def ring_slots(index: Array, window: int) -> Array:
    """int32 [W]: the slot each ring position holds before slots from `index` on are written
    (negative: none yet)."""
    r = jnp.arange(window)
    return index - 1 - jnp.mod(index - 1 - r, window)


def ring_attention_mask(kv_mask: Array, index: Array, num_new: int, window: int) -> Array:
    """bool [B, 1, T, W + T]: what the new token at slot index + t of a ring layer sees among
    the keys [ring (before the write) | the T new tokens]: real slots within its last W
    positions, causally (itself always)."""
    slots = jnp.concatenate([ring_slots(index, window), index + jnp.arange(num_new)])  # [W + T]
    real = jnp.take(kv_mask, jnp.clip(slots, 0, kv_mask.shape[1] - 1), axis=1) & (slots >= 0)[None]
    query = index + jnp.arange(num_new)[:, None]                                       # [T, 1]
    within = (slots[None] <= query) & (slots[None] > query - window)
    return ((real[:, None, None, :] & within[None, None]) | (slots[None] == query)[None, None])
