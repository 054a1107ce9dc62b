"""The pure math of a decoder layer: norms, activations, RoPE, projections, MLP blocks.

Functions of arrays and a `ModelConfig`'s numbers, no module state. A layer's weights
arrive as one dict `p` of per-layer arrays (one slice of the layer scan's xs, plus LoRA
factors when adapters are attached); `layer_weight` is the one place a weight is read
from it, so a stored form other than the compute dtype (a quantised base) changes
that function only. The families (kto_jax/models/families/) choose among the blocks
defined here: which norm formula, which MLP block, which activation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kto_jax.models import quantize
from kto_jax.sharding import constrain

Array = jax.Array
# Logical axes of activations (kto_jax.sharding.constrain: a no-op without a mesh and rules).
ACT_EMBED = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
ACT_MLP = ("batch", "length", "mlp")


# ---- norms and activations ----

def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm over the last axis, normalised in float32 then scaled in x's dtype (as HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rms_norm_plus_one(x: Array, weight: Array, eps: float) -> Array:
    """Gemma's RMSNorm: x normalised and scaled by (1 + weight), both in float32, then cast
    to x's dtype (as HF's Gemma2RMSNorm / Gemma3RMSNorm; a zero weight scales by 1)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def soft_cap(x: Array, cap: float | None) -> Array:
    """cap * tanh(x / cap): Gemma's soft-capping of attention and final logits; x when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def masked_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                     softcap: float | None = None) -> Array:
    """softmax(soft_cap(scale q k^T) where mask) v: q [B, T, H, hd], k, v [B, S, K, hd] ->
    [B, T, H, hd], mask bool broadcastable to [B, 1, T, S] (every visibility rule in it).

    With softcap None this is `jax.nn.dot_product_attention` (jax's choice of backend);
    with a cap, the logits are computed explicitly in float32 (grouped-query: each of
    the K kv heads serves H / K query heads), as XLA's attention does without one.
    """
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = soft_cap(logits, softcap)                                   # [B, K, G, T, S]
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


# HF `hidden_act` -> the function the gated MLP applies to its gate (HF ACT2FN names).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,                                               # SwiGLU (Llama, Mistral, Qwen)
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GeGLU, tanh-approximated
}


# ---- RoPE ----

def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Array:
    """float32 [head_dim/2] inverse frequencies of base `theta`, with HF `rope_scaling`
    ('linear' or 'llama3'; None or 'default': none) applied."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """cos and sin, float32 [B, T, head_dim/2], of positions * inv_freq."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate [B, T, N, hd] by RoPE in HF's half-split layout (x1 = first half, x2 = second)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# ---- weights and projections ----

def layer_weight(p: dict[str, Array], name: str, dtype: Any) -> Array:
    """The layer weight `name` of p in `dtype`: the one place a layer reads a stored weight.
    A quantised one (QLoRA: this layer's slice of its codes and scales) is dequantised here,
    inside the layer scan, so only one layer's weights exist in `dtype` at a time."""
    w = p[name]
    if isinstance(w, (quantize.Int8Weight, quantize.Nf4Weight)):
        return quantize.dequantize(w, dtype)
    return w.astype(dtype)


def dense(equation: str, x: Array, p: dict[str, Array], name: str) -> Array:
    """einsum(equation, x, W) for the layer weight W = p[name], in x's dtype, plus the LoRA
    term (x A) (scale B) when p holds `{name}_lora_a` / `_lora_b` (kto_jax.models.lora).

    A has W's contracted axes then r, B has r then W's output axes, so both einsums
    follow from `equation`. With `lora_dropout_key` in p, x is dropped out first
    (a separate mask per target, as PEFT's per-module dropout).
    """
    y = jnp.einsum(equation, x, layer_weight(p, name, x.dtype))
    if name + "_lora_a" not in p:
        return y
    lhs, w_in_out = equation.split(",")
    w, out = w_in_out.split("->")
    contracted = "".join(c for c in w if c in lhs)
    kept = "".join(c for c in lhs if c not in contracted)
    if "lora_dropout_key" in p:
        keep = 1.0 - p["lora_dropout_rate"]
        key = jax.random.fold_in(p["lora_dropout_key"], sum(map(ord, name)))
        x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep.astype(x.dtype), 0).astype(x.dtype)
    xa = jnp.einsum(f"{lhs},{contracted}r->{kept}r", x, p[name + "_lora_a"].astype(x.dtype))
    produced = "".join(c for c in w if c not in contracted)
    return y + jnp.einsum(f"{kept}r,r{produced}->{out}", xa, p[name + "_lora_b"].astype(x.dtype))


def project_qkv(p: dict[str, Array], x: Array, cfg: Any, norm: Callable) -> tuple[Array, Array, Array]:
    """q [B, T, H, hd], k and v [B, T, K, hd] of x [B, T, D], before RoPE: the q/k/v bias
    (cfg.attention_bias) and the q/k norm (cfg.qk_norm, with the family's `norm`) applied."""
    dt = x.dtype
    q = dense("btd,dnh->btnh", x, p, "q_proj")    # [B, T, H, hd]
    k = dense("btd,dnh->btnh", x, p, "k_proj")    # [B, T, K, hd]
    v = dense("btd,dnh->btnh", x, p, "v_proj")    # [B, T, K, hd]
    if cfg.attention_bias:
        q, k, v = (q + layer_weight(p, "q_bias", dt), k + layer_weight(p, "k_bias", dt),
                   v + layer_weight(p, "v_bias", dt))
    if cfg.qk_norm:
        q, k = norm(q, p["q_norm"], cfg.rms_norm_eps), norm(k, p["k_norm"], cfg.rms_norm_eps)
    return q, k, v


def project_out(p: dict[str, Array], out: Array) -> Array:
    """The output projection of attention heads [B, T, H, hd] -> [B, T, D]."""
    out = constrain(out, ACT_HEADS)
    return constrain(dense("btnh,nhd->btd", out, p, "o_proj"), ACT_EMBED)


# ---- MLP blocks ----

@dataclasses.dataclass(frozen=True)
class MlpBlock:
    """An MLP a family can choose: its per-layer parameters and its function.

    shapes(cfg) gives {name: per-layer shape} in the order the parameters are created
    (the order of the random draws), axes {name: logical axes}, apply(p, x, cfg) maps
    x [B, T, D] to [B, T, D]. A mixture of experts is another block (router and experts).
    """

    shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    axes: dict[str, tuple[str, ...]]
    apply: Callable[[dict[str, Array], Array, Any], Array]


def gated_mlp(p: dict[str, Array], x: Array, cfg: Any) -> Array:
    """down(act(gate(x)) * up(x)) for x [B, T, D]; act = ACTIVATIONS[cfg.hidden_act] (SwiGLU, GeGLU)."""
    gate = constrain(dense("btd,df->btf", x, p, "gate_proj"), ACT_MLP)
    up = constrain(dense("btd,df->btf", x, p, "up_proj"), ACT_MLP)
    act = ACTIVATIONS[cfg.hidden_act]
    return constrain(dense("btf,fd->btd", act(gate) * up, p, "down_proj"), ACT_EMBED)


GATED_MLP = MlpBlock(
    shapes=lambda cfg: {"gate_proj": (cfg.hidden_size, cfg.intermediate_size),
                        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
                        "down_proj": (cfg.intermediate_size, cfg.hidden_size)},
    axes={"gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed")},
    apply=gated_mlp,
)
