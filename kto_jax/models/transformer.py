"""One Flax NNX decoder-only transformer for every supported HF architecture.

Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3 differ only by ModelConfig switches:
grouped-query attention with RoPE (optionally llama3-scaled), RMSNorm, SwiGLU MLP,
optional q/k/v bias (Qwen2), optional q/k RMSNorm (Qwen3), tied or untied lm_head.

The L decoder layers are stored stacked: every layer parameter has a leading
'layers' axis of size L and the forward pass runs them with one `jax.lax.scan`, so
an 8B or 70B program compiles as fast as a 1-layer one. Each parameter carries its
logical axis names in the `out_sharding` metadata (never mesh axis names);
`kto_jax.sharding` maps them to the mesh.

Interface (other modules code against exactly this):
    model = Transformer(config, rngs=nnx.Rngs(0))
    hidden = model.hidden_states(input_ids, positions, attention_mask)  # [B,T,D], compute dtype
    w = model.lm_head_weight()                                          # [D,V], compute dtype
    logits = model(input_ids, positions, attention_mask)                # [B,T,V] float32
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kto_jax.models.config import ModelConfig
from kto_jax.models.packed_attention import PackedLayout, attend as packed_attend
from kto_jax.sharding import constrain
from kto_jax.models.splash_attention import BLOCK as SPLASH_BLOCK, splash_attention

Array = jax.Array
_INIT_STD = 0.02  # HF initializer_range
# Logical axes of activations (kto_jax.sharding.constrain: a no-op without a mesh and rules).
ACT_EMBED = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
ACT_MLP = ("batch", "length", "mlp")

# Layer parameter name -> logical axes (after the leading 'layers' axis). Names mirror HF.
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "input_layernorm": ("embed",),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "o_proj": ("heads", "head_dim", "embed"),
    "post_attention_layernorm": ("embed",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def positions_from_mask(attention_mask: Array) -> Array:
    """RoPE positions for rows with left and/or right padding.

    Args:
      attention_mask: int [B, T], 1 on real tokens, 0 on padding (either side).
    Returns:
      int32 [B, T]: 0, 1, 2, ... over the real tokens of each row, counted from the
      first real token; left padding gets 0, right padding repeats the last position.
    """
    mask = jnp.asarray(attention_mask, jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each present layer parameter, without the leading 'layers' axis."""
    d, f, h, k, hd = (config.hidden_size, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.head_dim)
    shapes = {
        "input_layernorm": (d,), "q_proj": (d, h, hd), "k_proj": (d, k, hd), "v_proj": (d, k, hd),
        "o_proj": (h, hd, d), "post_attention_layernorm": (d,),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    if config.attention_bias:
        shapes.update(q_bias=(h, hd), k_bias=(k, hd), v_bias=(k, hd))
    if config.qk_norm:
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    return shapes


def _param(value: Array, axes: tuple[str, ...]) -> nnx.Param:
    # eager_sharding=False: the names are logical, they meet the mesh only in kto_jax.sharding.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _init_value(name: str, shape: tuple[int, ...], dtype, key: Array) -> Array:
    if name.endswith(("layernorm", "_norm")):
        return jnp.ones(shape, dtype)
    if name.endswith("_bias"):
        return jnp.zeros(shape, dtype)
    return (_INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class DecoderLayers(nnx.Module):
    """All L decoder layers' parameters, stacked along a leading 'layers' axis."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        for name, shape in layer_param_shapes(config).items():
            value = _init_value(name, (config.num_layers, *shape), dtype, rngs.params())
            setattr(self, name, _param(value, ("layers", *LAYER_AXES[name])))

    def arrays(self) -> dict[str, Array]:
        """{name: [L, ...] array} of the present parameters (the scan's xs)."""
        return {name: getattr(self, name)[...] for name in LAYER_AXES if hasattr(self, name)}


class Transformer(nnx.Module):
    """Decoder-only causal LM; see the module docstring for the interface."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        v, d = config.vocab_size, config.hidden_size
        self.embed_tokens = _param(_init_value("embed", (v, d), dtype, rngs.params()), ("vocab", "embed"))
        self.layers = DecoderLayers(config, rngs=rngs)
        self.norm = _param(jnp.ones((d,), dtype), ("embed",))
        if not config.tie_word_embeddings:
            self.lm_head = _param(_init_value("lm_head", (d, v), dtype, rngs.params()), ("embed", "vocab"))

    def hidden_states(self, input_ids: Array, positions: Array | None = None,
                      attention_mask: Array | None = None, packed: PackedLayout | None = None) -> Array:
        """Final-norm hidden states.

        Args:
          input_ids: int32 [B, T] token ids (padding ids are arbitrary but in range).
          positions: int32 [B, T] RoPE positions, e.g. `positions_from_mask(attention_mask)`;
            None: 0..T-1 in every row (full, unpadded rows).
          attention_mask: int [B, T], 1 on real tokens, 0 on padding; padding may sit on
            the left and on the right of the same row. None when every row's real tokens
            come first (right padding only): attention is then causal alone, with no
            [B, 1, T, T] mask, the form flash-attention kernels run fastest (a real query
            never sees a later, padded key).
          packed: packed rows of several [x | y | y2] examples instead (segment and
            branch ids, per-segment positions; kto_jax/models/packed_attention.py):
            attention then follows that layout and `attention_mask` must be None.
        Returns:
          [B, T, D] in the compute dtype; rows at padded positions are meaningless.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)
        h = constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dtype), ACT_EMBED)
        cos, sin = rope_cos_sin(positions, cfg)                                # [B, T, hd/2] f32
        mask = None if attention_mask is None else attention_mask_4d(attention_mask)  # [B, 1, T, T]
        if packed is not None:
            assert attention_mask is None, "packed rows carry their own mask"
            mask = packed
        impl = cfg.attention_impl  # "auto" is resolved per layer call: resolve_attention_impl

        def layer(h: Array, p: dict[str, Array]) -> tuple[Array, None]:
            return decoder_layer(p, h, cos, sin, mask, cfg, impl), None

        layer = _remat(layer, cfg.remat_policy)
        h, _ = jax.lax.scan(layer, h, self.layer_arrays())
        return constrain(rms_norm(h, self.norm[...], cfg.rms_norm_eps), ACT_EMBED)  # [B, T, D]

    def layer_arrays(self) -> dict[str, Array]:
        """The layer scan's xs: the stacked weights, plus LoRA factors when adapters are attached
        (`kto_jax.models.lora.attach` sets `self.lora`; `dense` applies them)."""
        lora = getattr(self, "lora", None)
        arrays = self.layers.arrays()
        return arrays if lora is None else {**arrays, **lora.scan_inputs(self.config.num_layers)}

    def lm_head_weight(self) -> Array:
        """[D, V] output projection in the compute dtype; the embedding transposed when tied."""
        w = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(jnp.dtype(self.config.dtype))

    def __call__(self, input_ids: Array, positions: Array | None = None,
                 attention_mask: Array | None = None) -> Array:
        """[B, T, V] float32 logits = hidden_states @ lm_head_weight (float32 accumulation).

        `model(input_ids)` alone treats every row as full and unpadded (positions 0..T-1,
        causal attention); pass positions and mask for padded rows (see hidden_states).
        """
        hidden = self.hidden_states(input_ids, positions, attention_mask)
        return jnp.einsum("btd,dv->btv", hidden, self.lm_head_weight(),
                          preferred_element_type=jnp.float32)

    def cached_hidden_states(self, input_ids: Array, positions: Array, new_mask: Array,
                             cache: "KVCache", index: Array) -> tuple[Array, "KVCache"]:
        """Final-norm hidden states of T new tokens written at cache slots [index, index + T).

        The generation path (kto_jax.eval.sampling): the same layers as `hidden_states`,
        attending to everything already in `cache` plus the new tokens, causally.

        Args:
          input_ids: int32 [B, T] new tokens (a left-padded prompt at index 0, then one
            token per decode step).
          positions: int32 [B, T] their RoPE positions.
          new_mask: int [B, T], 1 on real tokens; recorded in cache.mask.
          cache: a `KVCache` of S >= index + T slots (`init_kv_cache`).
          index: int32 scalar, the slot of the first new token.
        Returns:
          ([B, T, D] hidden states in the compute dtype, the updated cache).
        """
        cfg = self.config
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(jnp.dtype(cfg.dtype))
        cos, sin = rope_cos_sin(positions, cfg)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, new_mask.astype(bool), index, axis=1)
        mask = cached_attention_mask(kv_mask, index, input_ids.shape[1], cfg.sliding_window)
        impl = None  # jax's choice: cuDNN flash attention rejects one-token queries and arbitrary masks

        def layer(carry, xs):
            h, k_all, v_all = carry
            p, i = xs
            h, k_all, v_all = cached_decoder_layer(p, h, cos, sin, mask, k_all, v_all, i, index, cfg, impl)
            return (h, k_all, v_all), None

        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, k_all, v_all), _ = jax.lax.scan(layer, (h, cache.k, cache.v), (self.layer_arrays(), layers))
        return rms_norm(h, self.norm[...], cfg.rms_norm_eps), KVCache(k_all, v_all, kv_mask)


def abstract_model(config: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves and no allocation (for loaders and AOT)."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


# ---- pure layer math ----

def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm over the last axis, normalised in float32 then scaled in x's dtype (as HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Array:
    """float32 [head_dim/2] inverse frequencies, with 'linear' or 'llama3' scaling applied."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    scaling = config.rope_scaling_dict or {}
    if config.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if config.rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: Array, config: ModelConfig) -> tuple[Array, Array]:
    """cos and sin, float32 [B, T, head_dim/2], of positions * inv_freq."""
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate [B, T, N, hd] by RoPE in HF's half-split layout (x1 = first half, x2 = second)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention_mask_4d(attention_mask: Array) -> Array:
    """bool [B, 1, T, T]: query t may see key s iff s is a real token or s == t.

    Causality (and a sliding window) is added by dot_product_attention itself. The
    diagonal keeps padded query rows from being fully masked (no NaN anywhere).
    """
    valid = attention_mask.astype(bool)                       # [B, T]
    t = attention_mask.shape[-1]
    eye = jnp.eye(t, dtype=bool)
    return (valid[:, None, None, :] | eye[None, None]).astype(bool)


def decoder_layer(p: dict[str, Array], h: Array, cos: Array, sin: Array, mask: Array,
                  cfg: ModelConfig, impl: str | None) -> Array:
    """One pre-norm decoder layer: h + attn(norm(h)), then + mlp(norm(.)). h: [B, T, D]."""
    h = constrain(h, ACT_EMBED)
    h = h + attention(p, rms_norm(h, p["input_layernorm"], cfg.rms_norm_eps), cos, sin, mask, cfg, impl)
    h = constrain(h, ACT_EMBED)
    return constrain(h + swiglu(p, rms_norm(h, p["post_attention_layernorm"], cfg.rms_norm_eps)), ACT_EMBED)


def attention(p: dict[str, Array], x: Array, cos: Array, sin: Array, mask: Array,
              cfg: ModelConfig, impl: str | None) -> Array:
    """Causal grouped-query attention of x [B, T, D] -> [B, T, D].

    mask: None, bool [B, 1, T, T], or a PackedLayout (packed rows, packed_attention.py).
    """
    q, k, v = project_qkv(p, x, cos, sin, cfg)
    if isinstance(mask, PackedLayout):  # packed [x | y | y2] rows
        return project_out(p, packed_attend(q, k, v, mask, scale=cfg.head_dim ** -0.5,
                                            sliding_window=cfg.sliding_window, impl=impl))
    impl = resolve_attention_impl(impl, q, mask)
    window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else None

    def dot_product_attention(q, k, v, implementation=impl):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=cfg.head_dim ** -0.5,
                                            is_causal=True, local_window_size=window,
                                            implementation=implementation)

    if impl in ("splash", "splash_on_tpu"):
        fallback = functools.partial(dot_product_attention, implementation=None)
        out = splash_attention(q, k, v, scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window,
                               fallback=fallback if impl == "splash_on_tpu" else None)
    else:
        out = dot_product_attention(q, k, v)
    return project_out(p, out)


def project_qkv(p: dict[str, Array], x: Array, cos: Array, sin: Array,
                cfg: ModelConfig) -> tuple[Array, Array, Array]:
    """q [B, T, H, hd], k and v [B, T, K, hd] of x [B, T, D]: bias, q/k-norm and RoPE applied."""
    dt = x.dtype
    q = dense("btd,dnh->btnh", x, p, "q_proj")    # [B, T, H, hd]
    k = dense("btd,dnh->btnh", x, p, "k_proj")    # [B, T, K, hd]
    v = dense("btd,dnh->btnh", x, p, "v_proj")    # [B, T, K, hd]
    if cfg.attention_bias:
        q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return constrain(q, ACT_HEADS), constrain(k, ACT_KV_HEADS), constrain(v, ACT_KV_HEADS)


def project_out(p: dict[str, Array], out: Array) -> Array:
    """The output projection of attention heads [B, T, H, hd] -> [B, T, D]."""
    out = constrain(out, ACT_HEADS)
    return constrain(dense("btnh,nhd->btd", out, p, "o_proj"), ACT_EMBED)


def swiglu(p: dict[str, Array], x: Array) -> Array:
    """down(silu(gate(x)) * up(x)) for x [B, T, D]."""
    gate = constrain(dense("btd,df->btf", x, p, "gate_proj"), ACT_MLP)
    up = constrain(dense("btd,df->btf", x, p, "up_proj"), ACT_MLP)
    return constrain(dense("btf,fd->btd", jax.nn.silu(gate) * up, p, "down_proj"), ACT_EMBED)


def dense(equation: str, x: Array, p: dict[str, Array], name: str) -> Array:
    """einsum(equation, x, W) for the layer weight W = p[name], in x's dtype, plus the LoRA
    term (x A) (scale B) when p holds `{name}_lora_a` / `_lora_b` (kto_jax.models.lora).

    A has W's contracted axes then r, B has r then W's output axes, so both einsums
    follow from `equation`. With `lora_dropout_key` in p, x is dropped out first
    (a separate mask per target, as PEFT's per-module dropout).
    """
    y = jnp.einsum(equation, x, p[name].astype(x.dtype))
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


# ---- KV cache (generation) ----

class KVCache(NamedTuple):
    """Keys and values of every layer for S slots; slot order is the token order.

    k, v: [L, B, S, K, hd] in the compute dtype (RoPE already applied to k).
    mask: bool [B, S], True on slots that hold a real token (False: padding or unwritten).
    """
    k: Array
    v: Array
    mask: Array


def init_kv_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots for `batch` rows, in the compute dtype."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool))


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


def cached_decoder_layer(p: dict[str, Array], h: Array, cos: Array, sin: Array, mask: Array,
                         k_all: Array, v_all: Array, layer: Array, index: Array,
                         cfg: ModelConfig, impl: str | None) -> tuple[Array, Array, Array]:
    """`decoder_layer` for new tokens h [B, T, D] against the cache of layer `layer`.

    Writes this layer's new keys/values into k_all, v_all [L, B, S, K, hd] at slots
    [index, index + T) (in place inside the scan carry), then attends over all S slots
    with `mask` ([B, 1, T, S], from `cached_attention_mask`).
    """
    x = rms_norm(h, p["input_layernorm"], cfg.rms_norm_eps)
    q, k, v = project_qkv(p, x, cos, sin, cfg)
    start = (layer, 0, index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
    keys = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False).astype(q.dtype)
    values = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False).astype(q.dtype)
    out = jax.nn.dot_product_attention(q, keys, values, mask=mask, scale=cfg.head_dim ** -0.5,
                                       implementation=impl)
    h = h + project_out(p, out)
    return h + swiglu(p, rms_norm(h, p["post_attention_layernorm"], cfg.rms_norm_eps)), k_all, v_all


def resolve_attention_impl(name: str | None, q: Array, mask: Array | None = None) -> str | None:
    """The `implementation` for jax.nn.dot_product_attention of query q [B, T, H, hd].

    'auto' picks cuDNN flash attention on GPUs where it applies: causal attention with
    no explicit mask (cuDNN would turn a mask into a [B, 1, T, T] bias it reads per
    head), 16-bit q, head_dim a multiple of 8 up to 128, T a multiple of 64 (cuDNN
    refuses e.g. T=1023). Elsewhere, mask-free calls with T a multiple of 128 get
    'splash_on_tpu': the Pallas splash kernel when lowered for a TPU (a TPU run, or
    an AOT compile for one on a CPU host), XLA's attention when lowered for anything
    else (kto_jax/models/splash_attention.py). Otherwise None, XLA's attention.
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


_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(fn: Callable, policy: str) -> Callable:
    """Wrap a scan body in jax.checkpoint: 'full' saves nothing, 'dots*' save matmul outputs."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy], prevent_cse=False)
