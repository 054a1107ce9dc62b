"""Attention over packed rows: several examples per row, each a small tree [x | y | y2].

A packed row holds whole examples one after the other (kto_jax/data/packing.py).
Each example is its prompt x, then its completion y, then a second completion y2
of the SAME prompt: the KL completion y_kl of KTO (docs/design.md, "Making KTO cheap"),
or the rejected y_l of a paired loss ([x | y_w | y_l]). Both completions are
continuations of x, so x is run once for the two.

The layout, per token of a [B, T] row (the smallest description every backend can
take; positions are the model's usual RoPE positions):
  segment_ids  int32 [B, T]: 1, 2, ... per example in the row, 0 on padding.
  branch_ids   int32 [B, T]: BRANCH_PROMPT (0) on x, BRANCH_FIRST (1) on y,
               BRANCH_SECOND (2) on y2.
  positions    int32 [B, T]: 0 .. len(x)-1 on x, then len(x) .. on y, and again
               len(x) .. on y2 (y2 continues x, not y).
Query q sees key k iff both are in the same example, k is not after q in the row,
k is a prompt token or on q's own branch, and (sliding-window models) k is among
the last W positions of q in POSITION space: pos[q] - pos[k] < W. So y2 attends x
and itself, never y, exactly as the padded row (x, y2) would.

Backends:
- xla: the explicit bool [B, 1, T, T] mask of that rule (`packed_mask`),
  causality and window included, handed to jax.nn.dot_product_attention.
- cudnn: jax 0.10's jax.nn.dot_product_attention takes no segment ids for cuDNN
  (only per-row q/kv sequence lengths; the segment offsets of cuDNN's packed layout
  are internal, jax._src, and describe contiguous segments, not a tree). The packed
  mask is passed as `mask`, which cuDNN applies as a [B, 1, T, T] bias: no
  causal block skipping, plus a T x T read per row and layer.
- splash (kto_jax/models/splash_attention.py `splash_packed_attention`): the
  kernel's segment ids only say "same id", which cannot say "y2 sees x but not y".
  The keys are therefore doubled: [K2 | K], where K2 holds a copy of every
  example's x keys, moved right by len(y) so that, column for column, the copy of
  x ends where y2 begins (column distances = position distances, so causality
  and the sliding window stay exact). Queries of x and y carry id 2s, queries of
  y2 id 2s+1; K carries 2s on x and y, 2s+1 on y2; K2 carries 2s+1 on the copied
  x and -1 elsewhere. Cost: attention over 2T keys (about twice the attention
  FLOPs of the row; the projections and MLP are unchanged). Rows without trees
  (`chains`: the kl stream's main rows [x | y]) take the plain form instead: segment
  ids over T keys (`splash_segment_attention`), and the explicit mask has no tree term.

The kl stream (losses with z0, kto_jax/data/packing.py `pack_streams`): main rows hold
[x | y] only (no tree: branch ids 0 and 1, so the rule above is segments + causal) and
parallel kl rows [B, Tk] hold the KL completions y_kl, each with its example's segment
id and positions continuing x. A kl query sees the x keys of its segment in the main
row (`attend_kl`: [K_main | K_kl], key x's position < the query's always) and the kl
keys of its segment at or before it, within the window in position space: exactly the
keys of the padded row (x, y_kl). Main queries never see kl keys. The kl queries use
the explicit [B, 1, Tk, T + Tk] mask with XLA's attention (Tk x (T + Tk) scores per
head and row, forward only: the kl stream has no backward).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kto_jax.models.layers import masked_attention

Array = jax.Array
BRANCH_PROMPT, BRANCH_FIRST, BRANCH_SECOND = 0, 1, 2


class PackedLayout(NamedTuple):
    """Where each token of packed rows sits; see the module docstring. All int32 [B, T];
    branch_ids None for rows of contiguous segments without a tree (`chains`)."""
    segment_ids: Array
    branch_ids: Array | None
    positions: Array


def chains(layout: PackedLayout) -> PackedLayout:
    """The layout of rows whose segments hold no second completion (the kl stream's main
    rows [x | y]): attention is segments + causal, no tree, so the branch ids are dropped
    and the kernels take the plain segment form (no doubled keys)."""
    return layout._replace(branch_ids=None)


class KlRows(NamedTuple):
    """The kl stream of packed rows (module docstring): int32 [B, Tk] each."""
    ids: Array
    positions: Array
    segment_ids: Array


def kl_mask(layout: PackedLayout, kl: KlRows, sliding_window: int | None) -> Array:
    """bool [B, 1, Tk, T + Tk]: kl query q may see main key k (x of its segment) or kl key k
    (its segment, at or before it); the diagonal of the kl part always (padding queries)."""
    seg, branch, pos = layout
    kseg, kpos = kl.segment_ids, kl.positions
    tk = kseg.shape[-1]
    main = ((kseg[:, :, None] == seg[:, None, :]) & (kseg[:, :, None] > 0)
            & (branch[:, None, :] == BRANCH_PROMPT))
    col = jnp.arange(tk)
    own = ((kseg[:, :, None] == kseg[:, None, :]) & (kseg[:, :, None] > 0)
           & (col[None, :, None] >= col[None, None, :]))
    if sliding_window:
        main &= (kpos[:, :, None] - pos[:, None, :]) < sliding_window
        own &= (kpos[:, :, None] - kpos[:, None, :]) < sliding_window
    own |= jnp.eye(tk, dtype=bool)[None]
    return jnp.concatenate([main, own], axis=-1)[:, None]


def attend_kl(q: Array, k: Array, v: Array, k_main: Array, v_main: Array, layout: PackedLayout,
              kl: KlRows, *, scale: float, sliding_window: int | None,
              softcap: float | None = None) -> Array:
    """Attention of the kl stream: q, k, v [B, Tk, ., hd] of the kl rows over the keys
    [k_main | k] ([B, T + Tk, K, hd]; the caller passes the main keys and values under
    stop_gradient) -> [B, Tk, H, hd]."""
    keys = jnp.concatenate([k_main.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([v_main.astype(v.dtype), v], axis=1)
    return masked_attention(q, keys, values, kl_mask(layout, kl, sliding_window), scale=scale,
                            softcap=softcap)


def packed_mask(layout: PackedLayout, sliding_window: int | None) -> Array:
    """bool [B, 1, T, T]: query q may see key k (the rule of the module docstring).

    The diagonal is always on, so padding queries (segment 0) see themselves and no
    row of the softmax is empty (no NaN anywhere).
    """
    seg, branch, pos = layout
    t = seg.shape[-1]
    col = jnp.arange(t)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    causal = col[None, :, None] >= col[None, None, :]
    allowed = same & causal
    if branch is not None:   # the tree: y2 sees x, not y
        allowed &= (branch[:, None, :] == BRANCH_PROMPT) | (branch[:, :, None] == branch[:, None, :])
    if sliding_window:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    return (allowed | jnp.eye(t, dtype=bool)[None])[:, None]


def splash_key_layout(layout: PackedLayout) -> tuple[Array, Array, Array]:
    """The segment ids and key copy of the splash form (module docstring).

    Returns:
      q_ids int32 [B, T]: 2s on x and y, 2s + 1 on y2 (0 on padding).
      kv_ids int32 [B, 2T]: ids of the keys [K2 | K]; -1 on K2 columns that hold no copy.
      copy_source int32 [B, T]: for each K2 column, the column of K it copies (0 where none).
    """
    seg, branch, _ = layout
    b, t = seg.shape
    second = (branch == BRANCH_SECOND).astype(jnp.int32)
    q_ids = 2 * seg + second
    # len(y) of each token's example: y tokens counted per segment id (ids < T + 1).
    first = ((branch == BRANCH_FIRST) & (seg > 0)).astype(jnp.int32)
    y_len = jax.vmap(lambda f, s: jax.ops.segment_sum(f, s, num_segments=t + 1)[s])(first, seg)
    is_x = (branch == BRANCH_PROMPT) & (seg > 0)
    col = jnp.arange(t, dtype=jnp.int32)[None]
    target = jnp.where(is_x, col + y_len, t)                  # t: dropped by the scatter
    rows = jnp.arange(b)[:, None]
    copy_source = jnp.zeros((b, t), jnp.int32).at[rows, target].set(
        jnp.broadcast_to(col, (b, t)), mode="drop")
    copy_ids = jnp.full((b, t), -1, jnp.int32).at[rows, target].set(2 * seg + 1, mode="drop")
    return q_ids, jnp.concatenate([copy_ids, q_ids], axis=1), copy_source


def attend(q: Array, k: Array, v: Array, layout: PackedLayout, *, scale: float,
           sliding_window: int | None, impl: str | None, softcap: float | None = None) -> Array:
    """Attention of packed rows: q [B, T, H, hd], k and v [B, T, K, hd] -> [B, T, H, hd].

    impl (ModelConfig.attention_impl): 'xla' and 'cudnn' take the explicit mask;
    'splash' runs the splash form everywhere (Pallas interpret mode off TPU); 'auto'
    runs it when lowered for a TPU and the explicit mask with XLA elsewhere (on GPUs
    too: cuDNN would read the mask as a dense bias). T must be a multiple of the
    splash block for the splash form, else XLA's attention is used. softcap: the
    attention-logit soft-cap (Gemma 2), which the splash kernel applies itself and the
    explicit-mask form computes with the logits (kto_jax/models/attention.py).
    """
    from kto_jax.models.splash_attention import (  # pylint: disable=import-outside-toplevel
        BLOCK, splash_packed_attention, splash_segment_attention)

    def dense(q, k, v, implementation=None):
        mask = packed_mask(layout, sliding_window)
        if softcap is not None:
            return masked_attention(q, k, v, mask, scale=scale, softcap=softcap)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation=implementation)

    if impl in ("xla", "cudnn"):
        return dense(q, k, v, impl)
    if impl in ("splash", "auto") and q.shape[1] % BLOCK == 0 and layout.branch_ids is None:
        return splash_segment_attention(q, k, v, layout.segment_ids, scale=scale,
                                        sliding_window=sliding_window, softcap=softcap,
                                        fallback=dense if impl == "auto" else None)
    if impl in ("splash", "auto") and q.shape[1] % BLOCK == 0:
        return splash_packed_attention(q, k, v, *splash_key_layout(layout), scale=scale,
                                       sliding_window=sliding_window, softcap=softcap,
                                       fallback=dense if impl == "auto" else None)
    return dense(q, k, v)
