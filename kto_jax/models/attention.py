"""Causal grouped-query attention of one layer, on every backend and row layout.

`attend` takes q, k, v after RoPE and one layer's static choices (its sliding window,
the backend) and returns the attention heads; the layer scan calls it once per layer
kind (kto_jax/models/transformer.py), so a window is always a Python number here and
each kernel (XLA, cuDNN, the Pallas splash kernel) gets it as it needs it.
Row layouts: full rows (causal only), padded rows (a [B, 1, T, T] key mask), packed
rows (a `PackedLayout`, kto_jax/models/packed_attention.py); the KV cache of generation
has its masks in kto_jax/models/kv_cache.py.

Soft-capped attention logits (Gemma 2: c * tanh(s / c) before the mask and softmax):
the splash kernel takes the cap itself; `jax.nn.dot_product_attention` has no such
argument on any backend (XLA, cuDNN), so there the logits are computed explicitly
(`masked_attention`: XLA, [B, H, T, S] scores, as XLA's own attention). A soft-capped
model therefore never runs cuDNN flash attention on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kto_jax.models.layers import masked_attention  # noqa: F401  (re-exported)
from kto_jax.models.packed_attention import PackedLayout, attend as packed_attend
from kto_jax.models.splash_attention import BLOCK as SPLASH_BLOCK, splash_attention

Array = jax.Array


def attention_mask_4d(attention_mask: Array) -> Array:
    """bool [B, 1, T, T]: query t may see key s iff s is a real token or s == t.

    Causality (and a sliding window) is added by dot_product_attention itself. The
    diagonal keeps padded query rows from being fully masked (no NaN anywhere).
    """
    valid = attention_mask.astype(bool)                       # [B, T]
    t = attention_mask.shape[-1]
    eye = jnp.eye(t, dtype=bool)
    return (valid[:, None, None, :] | eye[None, None]).astype(bool)


def attend(q: Array, k: Array, v: Array, mask: Array | PackedLayout | None, *, scale: float,
           window: int | None, impl: str | None, softcap: float | None = None) -> Array:
    """Causal attention of q [B, T, H, hd] over k, v [B, T, K, hd] -> [B, T, H, hd].

    mask: None (every row full or right-padded: causal alone), bool [B, 1, T, T]
    (`attention_mask_4d`), or a PackedLayout (packed rows). window: this layer's
    sliding window W (a query sees the last W positions), None for global attention.
    impl: ModelConfig.attention_impl ('auto' is resolved here per call). softcap: the
    attention-logit soft-cap c (ModelConfig.attn_logit_softcap) or None.
    """
    if isinstance(mask, PackedLayout):  # packed [x | y | y2] rows
        return packed_attend(q, k, v, mask, scale=scale, sliding_window=window, impl=impl,
                             softcap=softcap)
    impl = resolve_attention_impl(impl, q, mask)
    local = (window - 1, 0) if window else None

    def dot_product_attention(q, k, v, implementation=impl):
        if softcap is not None:  # no soft-cap argument in jax.nn.dot_product_attention: explicit logits
            visible = causal_mask(q.shape[1], window)
            visible = visible if mask is None else visible & mask
            return masked_attention(q, k, v, visible, scale=scale, softcap=softcap)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                            local_window_size=local, implementation=implementation)

    if impl in ("splash", "splash_on_tpu"):
        fallback = functools.partial(dot_product_attention, implementation=None)
        return splash_attention(q, k, v, scale=scale, sliding_window=window, softcap=softcap,
                                fallback=fallback if impl == "splash_on_tpu" else None)
    return dot_product_attention(q, k, v)


def causal_mask(t: int, window: int | None) -> Array:
    """bool [1, 1, T, T]: key s is at or before query t (and, with a window W, s > t - W)."""
    query, key = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = key <= query
    if window:
        visible &= key > query - window
    return visible[None, None]


def resolve_attention_impl(name: str | None, q: Array, mask: Array | None = None) -> str | None:
    """The `implementation` for jax.nn.dot_product_attention of query q [B, T, H, hd].

    'auto' picks cuDNN flash attention on GPUs where it applies: causal attention with
    no explicit mask (cuDNN would turn a mask into a [B, 1, T, T] bias it reads per
    head), 16-bit q, head_dim a multiple of 8 up to 128, T a multiple of 64 (cuDNN
    refuses e.g. T=1023). Elsewhere, mask-free calls with T a multiple of 128 get
    'splash_on_tpu': the Pallas splash kernel when lowered for a TPU (a TPU run, or
    an AOT compile for one on a CPU host), XLA's attention when lowered for anything
    else (kto_jax/models/splash_attention.py). Otherwise None, XLA's attention.
    (A soft-capped model falls back from cuDNN to XLA with explicit logits: `attend`.)
    jax's own None never picks cuDNN, and XLA's attention materialises [B, H, T, T]
    scores: 1.8x slower on an H200 (docs/design.md, "Performance facts"). 'xla' and
    'cudnn' pass through; 'splash' runs the kernel everywhere (Pallas interpret mode
    off TPU) and falls back to XLA when given a mask (the kernel here is causal-only).
    """
    if name == "splash":
        return "splash" if mask is None else None
    if name != "auto":
        return name
    if mask is not None:
        return None
    hd, t = q.shape[-1], q.shape[1]
    if jax.default_backend() == "gpu":
        cudnn = q.dtype in (jnp.bfloat16, jnp.float16) and hd % 8 == 0 and hd <= 128 and t % 64 == 0
        return "cudnn" if cudnn else None
    return "splash_on_tpu" if t % SPLASH_BLOCK == 0 else None
