"""One Flax NNX decoder-only transformer for every supported model family.

The families (kto_jax/models/families/) differ by the switches of their record and of
the ModelConfig: grouped-query attention with RoPE (optionally llama3-scaled; Gemma 3:
a local and a global table), the norm formula and where the norms sit (Gemma's (1 + w)
norms around attention and the MLP), the MLP block (SwiGLU, GeGLU), optional q/k/v bias
(Qwen2), optional q/k norm (Qwen3, Gemma 3), sliding windows (Mistral: every layer;
Ministral, Gemma: the layers `layer_types` names), Gemma's embedding scale, attention
scale and soft-caps, tied or untied lm_head.

The L decoder layers are stored stacked: every layer parameter has a leading
'layers' axis of size L and the forward pass runs them with one `jax.lax.scan`, so
an 8B or 70B program compiles as fast as a 1-layer one. Layers that differ without
changing their parameters (a sliding window or global attention, a local or global
RoPE table: `ModelConfig.layer_kinds`) still share that one scan: the scan carries
each layer's kind index, and the attention runs the branch of its kind through
`jax.lax.switch` (each branch static, so every kernel sees a fixed window). A model
whose layers are all alike has no switch at all. A mixture of experts with dense layers
among its sparse ones (`ModelConfig.dense_mlp_layers`) has two MLP stacks, [L_dense]
and [L_sparse], which the scan closes over: each layer takes its row of its kind's stack
(`mixed_mlp`, a `jax.lax.cond`). Each parameter carries its logical
axis names in the `out_sharding` metadata (never mesh axis names);
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
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kto_jax.models.attention import (  # noqa: F401  (resolve_attention_impl: re-exported)
    attend, attention_mask_4d, masked_attention, resolve_attention_impl)
from kto_jax.models.kv_cache import (  # noqa: F401  (KVCache, init_kv_cache: re-exported)
    CacheLayout, KVCache, cache_layout, cached_attention_mask, init_kv_cache, ring_attention_mask,
    write_kv_cache, write_ring)
from kto_jax.models.config import LayerKind, ModelConfig
from kto_jax.models.layers import (  # noqa: F401  (rms_norm, dense: re-exported)
    ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, GATED_MLP, apply_rope, dense, project_out, project_qkv, rms_norm,
    rope_cos_sin, rope_inv_freq, soft_cap)
from kto_jax.models import moe
from kto_jax.models.packed_attention import KlRows, PackedLayout, attend_kl, chains
from kto_jax.models.quantized_layers import quantized_rows, zero_projection
from kto_jax.sharding import constrain

Array = jax.Array
_INIT_STD = 0.02  # HF initializer_range

# Logical axes of the attention parameters (after the leading 'layers' axis). Names mirror HF.
ATTENTION_AXES: dict[str, tuple[str, ...]] = {
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "o_proj": ("heads", "head_dim", "embed"),
}
NORM_AXES = ("embed",)  # every layer norm, wherever it sits
# Layer parameter name -> logical axes of the Llama-shaped layer (its norms, attention with
# q/k/v bias and q/k norm, gated MLP); `layer_axes(config)` gives any family's.
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "input_layernorm": NORM_AXES,
    **ATTENTION_AXES,
    "post_attention_layernorm": NORM_AXES,
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
    """Shape of each present layer parameter, without the leading 'layers' axis, in the
    order the parameters are created (the order of their random draws)."""
    d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    norms = config.family.norms
    shapes = {norms.before_attention: (d,),
              "q_proj": (d, h, hd), "k_proj": (d, k, hd), "v_proj": (d, k, hd), "o_proj": (h, hd, d),
              norms.before_mlp: (d,), **config.family.mlp.shapes(config)}
    if config.dense_mlp_layers:  # a mixture of experts' dense layers: a gated MLP beside the experts
        shapes.update(GATED_MLP.shapes(config))
    if config.attention_bias:
        shapes.update(q_bias=(h, hd), k_bias=(k, hd), v_bias=(k, hd))
    if config.qk_norm:
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    for name in (norms.after_attention, norms.after_mlp):
        if name:
            shapes[name] = (d,)
    return shapes


def layer_axes(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Logical axes of each present layer parameter (after the 'layers' axis)."""
    axes = {**ATTENTION_AXES, **GATED_MLP.axes, **config.family.mlp.axes, **{n: NORM_AXES for n in config.family.norms.names()}}
    return {name: axes[name] for name in layer_param_shapes(config)}


def _param(value: Array, axes: tuple[str, ...]) -> nnx.Param:
    # eager_sharding=False: the names are logical, they meet the mesh only in kto_jax.sharding.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _init_value(name: str, shape: tuple[int, ...], dtype, key: Array, norm_init: float = 1.0) -> Array:
    if name.endswith(("layernorm", "_norm")) or name == "norm":
        return jnp.full(shape, norm_init, dtype)  # the family's identity scale (Gemma's (1 + w): 0)
    if name.endswith("_bias"):
        return jnp.zeros(shape, dtype)
    return (_INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class DecoderLayers(nnx.Module):
    """All L decoder layers' parameters, stacked along a leading 'layers' axis; under a
    quantised base (config.quantization) the projections are `QuantizedProjection`s
    (kto_jax/models/quantized_layers.py), dequantised one layer at a time in the scan."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        axes = layer_axes(config)
        quantized = quantized_rows(config) if config.quantization.enabled else {}
        for name, shape in layer_param_shapes(config).items():
            if name in quantized:  # QLoRA's frozen base: codes and scales, filled by its loader
                setattr(self, name, zero_projection(shape, quantized[name][1], axes[name], config.num_layers,
                                                    config.quantization))
                continue
            stack = len(config.stack_layers(name))  # L, or a dense / sparse MLP's layers (mlp_rows)
            value = _init_value(name, (stack, *shape), dtype, rngs.params(),
                                config.family.norm_init)
            setattr(self, name, _param(value, ("layers", *axes[name])))


class Transformer(nnx.Module):
    """Decoder-only causal LM; see the module docstring for the interface."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        v, d = config.vocab_size, config.hidden_size
        self.embed_tokens = _param(_init_value("embed", (v, d), dtype, rngs.params()), ("vocab", "embed"))
        self.layers = DecoderLayers(config, rngs=rngs)
        self.norm = _param(_init_value("norm", (d,), dtype, None, config.family.norm_init), ("embed",))
        if not config.tie_word_embeddings:
            self.lm_head = _param(_init_value("lm_head", (d, v), dtype, rngs.params()), ("embed", "vocab"))

    def hidden_states(self, input_ids: Array, positions: Array | None = None,
                      attention_mask: Array | None = None, packed: PackedLayout | None = None,
                      router_weight: Array | None = None, kl_rows: KlRows | None = None
                      ) -> Array | tuple[Array, Array]:
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
          router_weight: float [B, T], the weight of each token in a mixture of experts'
            load-balancing loss (1 on the real ones, 0 on padding), or None.
          kl_rows: with `packed`, the kl stream [B, Tk] (KL completions; packed_attention.py):
            run in the same layer scan with every parameter under stop_gradient, its
            queries attending the main rows' x keys (under stop_gradient) and its own, so
            autodiff sees it as a constant: no backward, nothing recomputed under remat.
        Returns:
          [B, T, D] in the compute dtype; rows at padded positions are meaningless. With
          `kl_rows`, the pair ([B, T, D], [B, Tk, D]) instead. With `router_weight` (a
          mixture of experts only), also the router statistics of every layer of the main
          rows, float32 [L, 2, E] (`kto_jax.models.moe.router_stats`).
        """
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)
        h = constrain(self.embed(input_ids), ACT_EMBED)
        ropes = rope_tables(positions, cfg)                                    # [B, T, hd/2] f32 each
        mask = None if attention_mask is None else attention_mask_4d(attention_mask)  # [B, 1, T, T]
        if packed is not None:
            assert attention_mask is None, "packed rows carry their own mask"
            mask = packed if kl_rows is None else chains(packed)   # main rows [x | y]: no tree
        impl = cfg.attention_impl  # "auto" is resolved per layer call: resolve_attention_impl
        kinds, kind_ids = cfg.layer_kinds()
        scale = cfg.attention_scale

        def attend_kind(kind: LayerKind, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
            q, k, v = rotate(kind, q, k, v, ropes=ropes)
            return attend(q, k, v, mask, scale=scale, window=kind.window, impl=impl,
                          softcap=cfg.attn_logit_softcap), k, v

        def attention(kind, p, x):
            q, k, v = project_qkv(p, x, cfg, cfg.family.norm)
            out, k, v = by_kind(kind, kinds, attend_kind, q, k, v)
            return project_out(p, out), (k, v)

        stacks = self.mlp_stacks()
        if kl_rows is None:
            def layer(h: Array, xs) -> tuple[Array, None]:
                p, kind = xs
                h, _, router = decoder_layer(p, h, functools.partial(attention, kind), cfg,
                                             router_weight, stacks)
                return h, router
        else:
            assert packed is not None, "a kl stream needs the packed main rows"
            kl_ropes = rope_tables(kl_rows.positions, cfg)

            def attend_kl_kind(kind: LayerKind, q: Array, k: Array, v: Array, k_main: Array,
                               v_main: Array) -> Array:
                q, k, v = rotate(kind, q, k, v, ropes=kl_ropes)
                return attend_kl(q, k, v, k_main, v_main, packed, kl_rows, scale=scale,
                                 sliding_window=kind.window, softcap=cfg.attn_logit_softcap)

            def layer(carry: tuple[Array, Array], xs) -> tuple[tuple[Array, Array], None]:
                (h, hk), (p, kind) = carry, xs
                h, (k, v), router = decoder_layer(p, h, functools.partial(attention, kind), cfg,
                                                  router_weight, stacks)
                main_kv = jax.lax.stop_gradient((k, v))
                frozen = constant(p)

                def kl_attention(p, x):
                    q, k, v = project_qkv(p, x, cfg, cfg.family.norm)
                    return project_out(p, by_kind(kind, kinds, attend_kl_kind, q, k, v, *main_kv)), None

                hk = decoder_layer(frozen, hk, kl_attention, cfg, None, constant(stacks))[0]
                return (h, hk), router

            h = (h, constrain(jax.lax.stop_gradient(self.embed(kl_rows.ids)), ACT_EMBED))
        layer = _remat(layer, cfg.remat_policy)
        h, router = jax.lax.scan(layer, h, (self.layer_arrays(), scanned_kinds(kinds, kind_ids)))
        if router is not None and stacks:  # the load-balancing loss counts the sparse layers only
            router = router[jnp.asarray(cfg.stack_layers("router"))]
        def final(x, w):
            return cfg.family.norm(x, w, cfg.rms_norm_eps)

        if kl_rows is None:
            hidden = constrain(final(h, self.norm[...]), ACT_EMBED)            # [B, T, D]
        else:
            hidden = (constrain(final(h[0], self.norm[...]), ACT_EMBED),
                      constrain(final(h[1], jax.lax.stop_gradient(self.norm[...])), ACT_EMBED))
        return hidden if router_weight is None else (hidden, router)

    def embed(self, input_ids: Array) -> Array:
        """[B, T, D] token embeddings in the compute dtype (scaled by sqrt(D) where the family says)."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dtype)
        if cfg.family.embed_scale:
            h = h * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
        return h

    def layer_arrays(self) -> dict[str, Array]:
        """The layer scan's xs: the stacked weights, plus LoRA factors when adapters are attached
        (`kto_jax.models.lora.attach` sets `self.lora`; `dense` applies them)."""
        cfg = self.config
        arrays = {name: getattr(self.layers, name)[...] for name in layer_param_shapes(cfg)
                  if len(cfg.stack_layers(name)) == cfg.num_layers}
        rows = cfg.mlp_rows()
        if rows is not None:  # each layer's MLP kind and its row in that kind's stack (`mlp_stacks`)
            arrays.update(mlp_kind=jnp.asarray(rows[0], jnp.int32), mlp_row=jnp.asarray(rows[1], jnp.int32))
        return {**arrays, **self._lora_inputs(stacked=False)}

    def mlp_stacks(self) -> dict[str, Array]:
        """A mixture of experts with dense layers (ModelConfig.dense_mlp_layers): the dense
        MLP's weights [L_dense, ...] and the router's and experts' [L_sparse, ...], with the
        LoRA factors of their targets, which the layer scan closes over (each layer takes
        its row, `mixed_mlp`); else {}."""
        cfg = self.config
        stacks = {name: getattr(self.layers, name)[...] for name in layer_param_shapes(cfg)
                  if len(cfg.stack_layers(name)) != cfg.num_layers}
        return {**stacks, **self._lora_inputs(stacked=True)} if stacks else stacks

    def _lora_inputs(self, stacked: bool) -> dict[str, Array]:
        """The attached adapters' scan inputs (`LoraAdapters.scan_inputs`): those of the
        targets in an MLP stack of their own (`stacked`), or the others."""
        lora, cfg = getattr(self, "lora", None), self.config
        if lora is None:
            return {}
        own = {t for t in lora.targets if len(_target_layers(cfg, t)) != cfg.num_layers}
        return {k: v for k, v in lora.scan_inputs(cfg.num_layers).items()
                if (k.rsplit("_lora_", 1)[0] in own) == stacked}

    def lm_head_weight(self) -> Array:
        """[D, V] output projection in the compute dtype; the embedding transposed when tied."""
        w = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(jnp.dtype(self.config.dtype))

    def logits(self, hidden: Array) -> Array:
        """float32 [..., V] logits of hidden states [..., D]: hidden @ lm_head_weight (float32
        accumulation), soft-capped where the model caps its final logits (Gemma 2)."""
        logits = jnp.einsum("...d,dv->...v", hidden, self.lm_head_weight(),
                            preferred_element_type=jnp.float32)
        return soft_cap(logits, self.config.final_logit_softcap)

    def __call__(self, input_ids: Array, positions: Array | None = None,
                 attention_mask: Array | None = None) -> Array:
        """[B, T, V] float32 logits of hidden_states (`logits`).

        `model(input_ids)` alone treats every row as full and unpadded (positions 0..T-1,
        causal attention); pass positions and mask for padded rows (see hidden_states).
        """
        return self.logits(self.hidden_states(input_ids, positions, attention_mask))

    def cached_hidden_states(self, input_ids: Array, positions: Array, new_mask: Array,
                             cache: KVCache, index: Array) -> tuple[Array, KVCache]:
        """Final-norm hidden states of T new tokens written at cache slots [index, index + T).

        The generation path (kto_jax.eval.sampling): the same layers as `hidden_states`,
        attending to everything already in `cache` plus the new tokens, causally; a
        sliding layer whose window is shorter than the cache keeps a ring of its last W
        slots (kto_jax/models/kv_cache.py).

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
        h = self.embed(input_ids)
        ropes = rope_tables(positions, cfg)
        t = input_ids.shape[1]
        kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, new_mask.astype(bool), index, axis=1)
        layout = cache_layout(cfg, cache.mask.shape[1])
        kinds, kind_ids = cfg.layer_kinds()
        masks = {kind.window: (ring_attention_mask(kv_mask, index, t, kind.window) if _in_ring(kind, layout)
                               else cached_attention_mask(kv_mask, index, t, kind.window))
                 for kind in kinds}                                  # [B, 1, T, S] or [B, 1, T, W + T]

        def attend_cache(kind: LayerKind, q: Array, k: Array, v: Array, stacks, gi: Array, ri: Array):
            k_all, v_all, ring_k, ring_v = stacks
            if _in_ring(kind, layout):  # the ring as it was, then the new tokens
                keys = jnp.concatenate([_layer(ring_k, ri), k.astype(ring_k.dtype)], axis=1)
                values = jnp.concatenate([_layer(ring_v, ri), v.astype(ring_v.dtype)], axis=1)
            else:                       # every slot (the new tokens written already)
                keys, values = _layer(k_all, gi), _layer(v_all, gi)
            # jax's choice of backend: cuDNN flash attention rejects one-token queries and arbitrary masks
            return masked_attention(q, keys.astype(q.dtype), values.astype(q.dtype), masks[kind.window],
                                    scale=cfg.attention_scale, softcap=cfg.attn_logit_softcap)

        def layer(carry, xs):
            h, stacks = carry
            p, gi, ri, kind = xs

            def attention(p, x):
                k_all, v_all, ring_k, ring_v = stacks
                q, k, v = project_qkv(p, x, cfg, cfg.family.norm)
                q, k, v = by_kind(kind, kinds, functools.partial(rotate, ropes=ropes), q, k, v)
                if k_all is not None:  # global layers (and the scratch layer for ring layers)
                    k_all, v_all = write_kv_cache(k_all, v_all, k, v, gi, index)
                out = by_kind(kind, kinds, attend_cache, q, k, v, (k_all, v_all, ring_k, ring_v), gi, ri)
                if ring_k is not None:  # ring layers (and the scratch layer for global layers)
                    ring_k, ring_v = write_ring(ring_k, ring_v, k, v, ri, index)
                return project_out(p, out), (k_all, v_all, ring_k, ring_v)

            return decoder_layer(p, h, attention, cfg, None, mlp_stacks)[:2], None

        mlp_stacks = self.mlp_stacks()

        xs = (self.layer_arrays(), jnp.asarray(layout.global_index, jnp.int32),
              jnp.asarray(layout.ring_index, jnp.int32), scanned_kinds(kinds, kind_ids))
        stacks = (cache.k, cache.v, cache.ring_k, cache.ring_v)
        (h, (k_all, v_all, ring_k, ring_v)), _ = jax.lax.scan(layer, (h, stacks), xs)
        hidden = cfg.family.norm(h, self.norm[...], cfg.rms_norm_eps)
        return hidden, KVCache(k_all, v_all, kv_mask, ring_k, ring_v)


def _in_ring(kind: LayerKind, layout: CacheLayout) -> bool:
    """Whether layers of this kind keep their keys in the cache's ring (window shorter than S)."""
    return layout.window is not None and kind.window == layout.window


def _layer(stack: Array, i: Array) -> Array:
    return jax.lax.dynamic_index_in_dim(stack, i, axis=0, keepdims=False)


def _target_layers(config: ModelConfig, target: str) -> tuple[int, ...]:
    """`kto_jax.models.lora.target_layers` (lora imports this module: no import back)."""
    return config.stack_layers(moe.EXPERT_ADAPTERS.get(target, (target,))[0])


def abstract_model(config: ModelConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves and no allocation (for loaders and AOT)."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


# ---- one layer ----

def decoder_layer(p: dict[str, Array], h: Array, attention: Callable, cfg: ModelConfig,
                  router_weight: Array | None = None, stacks: dict[str, Array] | None = None
                  ) -> tuple[Array, object, Array | None]:
    """One decoder layer of h [B, T, D]: h + attention(norm(h)), then h + mlp(norm(h)), with
    the family's norm formula, norm placement and MLP block.

    `attention(p, x)` returns (the attention output [B, T, D], anything else), the
    second passed through (the updated KV cache of generation); one layer body for
    training and generation, so the two cannot drift apart. With `router_weight` [B, T] a
    mixture of experts also returns its router statistics [2, E] (`moe.router_stats`),
    else None third. `stacks`: the MLP stacks of a mixture of experts with dense layers
    (`Transformer.mlp_stacks`; then the MLP is `mixed_mlp`).
    """
    family, eps = cfg.family, cfg.rms_norm_eps
    norms = family.norms
    h = constrain(h, ACT_EMBED)
    out, aux = attention(p, family.norm(h, p[norms.before_attention], eps))
    if norms.after_attention:
        out = family.norm(out, p[norms.after_attention], eps)
    h = constrain(h + out, ACT_EMBED)
    x = family.norm(h, p[norms.before_mlp], eps)
    if stacks:
        out, router = mixed_mlp(p, stacks, x, cfg, router_weight)
    else:
        out = family.mlp.apply(p, x, cfg)
        router = None if router_weight is None or not cfg.num_experts else moe.router_stats(p, x, cfg, router_weight)
    if norms.after_mlp:
        out = family.norm(out, p[norms.after_mlp], eps)
    return constrain(h + out, ACT_EMBED), aux, router


def mixed_mlp(p: dict[str, Array], stacks: dict[str, Array], x: Array, cfg: ModelConfig,
              router_weight: Array | None) -> tuple[Array, Array | None]:
    """The MLP of one layer of a mixture of experts with dense layers: `jax.lax.cond` on the
    layer's p["mlp_kind"] between the dense gated MLP and the family's experts, each taking
    row p["mlp_row"] of its stacks. With `router_weight`, the router statistics [2, E]
    (zeros in a dense layer; the scan's caller keeps the sparse layers' only)."""
    dense_names = [n for n in stacks if n.startswith(tuple(GATED_MLP.axes))]  # weights, LoRA factors
    dropout = {k: p[k] for k in ("lora_dropout_key", "lora_dropout_rate") if k in p}

    def row(names) -> dict[str, Array]:
        return {**dropout, **{n: _layer(stacks[n], p["mlp_row"]) for n in names}}

    def stats(q: dict[str, Array] | None) -> Array:
        if q is None or router_weight is None:
            return jnp.zeros((2, cfg.num_experts), jnp.float32)
        return moe.router_stats(q, x, cfg, router_weight)

    def dense_layer(x: Array) -> tuple[Array, Array]:
        return GATED_MLP.apply(row(dense_names), x, cfg), stats(None)

    def sparse_layer(x: Array) -> tuple[Array, Array]:
        q = row([n for n in stacks if n not in dense_names])
        return cfg.family.mlp.apply(q, x, cfg), stats(q)

    out, router = jax.lax.cond(p["mlp_kind"] == 1, sparse_layer, dense_layer, x)
    return out, None if router_weight is None else router


def constant(p: dict[str, Array]) -> dict[str, Array]:
    """A layer's weights (stored, LoRA, quantised) under stop_gradient: autodiff sees
    constants. Integer and key leaves (quantisation codes, dropout keys) pass as they are."""
    def stop(x):
        dtype = getattr(x, "dtype", None)
        return jax.lax.stop_gradient(x) if dtype is not None and jnp.issubdtype(dtype, jnp.inexact) else x
    return jax.tree.map(stop, p)


def rope_tables(positions: Array, cfg: ModelConfig) -> tuple[tuple[Array, Array], ...]:
    """(cos, sin), float32 [B, T, head_dim/2], of each of the config's RoPE tables."""
    return tuple(rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, theta, scaling))
                 for theta, scaling in cfg.rope_tables())


def rotate(kind: LayerKind, q: Array, k: Array, v: Array, *, ropes) -> tuple[Array, Array, Array]:
    """q and k rotated by the RoPE table of this layer kind; q, k, v pinned to their axes."""
    cos, sin = ropes[kind.rope]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return constrain(q, ACT_HEADS), constrain(k, ACT_KV_HEADS), constrain(v, ACT_KV_HEADS)


def scanned_kinds(kinds: tuple[LayerKind, ...], kind_ids: tuple[int, ...]) -> Array | None:
    """The layer scan's per-layer kind index, int32 [L]; None when every layer is alike."""
    return None if len(kinds) == 1 else jnp.asarray(kind_ids, jnp.int32)


def by_kind(kind: Array | None, kinds: tuple[LayerKind, ...], fn: Callable, *args):
    """fn(kinds[kind], *args): a plain call when every layer is alike (kind None), else a
    `jax.lax.switch` over the distinct kinds, each branch traced once with its static kind."""
    if kind is None:
        return fn(kinds[0], *args)
    return jax.lax.switch(kind, [functools.partial(fn, k) for k in kinds], *args)


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
