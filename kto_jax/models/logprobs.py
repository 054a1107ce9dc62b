"""Completion log-probs log pi(y|x) from a causal LM, computed in vocabulary chunks.

A sequence is the concatenation of a left-padded prompt [P] and a right-padded
completion [C], T = P + C. Each row is rotated so its real tokens come first
(`left_aligned`): the model then needs causal attention only, no [B, 1, T, T] mask,
and completion token j of a row whose prompt has n real tokens is predicted by the
hidden state at position n + j - 1. Only those C positions go through the LM head.

The LM head is applied in chunks of `vocab_chunk` columns with an online
log-sum-exp, so no [batch, C, vocab] float32 tensor is ever alive: the forward keeps
one [batch, C, vocab_chunk] block at a time, and the custom VJP recomputes the
blocks in the backward instead of saving them (residuals: the hidden states, the
head weight and the per-token log-normaliser). Everything is accumulated in float32
whatever the compute dtype of the hidden states.

The last chunk overlaps the one before it when `vocab_chunk` does not divide the
vocabulary; its already-counted columns are masked out, so no padded copy of the
head weight is made.

A model that soft-caps its final logits (Gemma 2: c * tanh(z / c),
`ModelConfig.final_logit_softcap`) has them capped chunk by chunk, inside the online
log-sum-exp; the backward multiplies by the cap's derivative 1 - (capped / c)^2.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kto_jax.models.layers import soft_cap
from kto_jax.models.moe import router_loss
from kto_jax.models.transformer import positions_from_mask

DEFAULT_VOCAB_CHUNK = 8192


def _chunk_start(k: jax.Array, chunk: int, vocab: int) -> jax.Array:
    """First column of chunk k; the last chunk is shifted left to stay in range."""
    return jnp.minimum(k * chunk, vocab - chunk)


def _chunk_logits(h: jax.Array, w: jax.Array, labels: jax.Array, k: jax.Array, chunk: int,
                  softcap: float | None):
    """Chunk k of the logits: (float32 [B, C, chunk] logits, soft-capped when `softcap` is set,
    with columns of earlier chunks at -inf, bool [B, C, chunk] one-hot of the labels among
    this chunk's fresh columns, start)."""
    vocab = w.shape[1]
    start = _chunk_start(k, chunk, vocab)
    w_c = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
    logits = soft_cap(jnp.einsum("bcd,dv->bcv", h, w_c, preferred_element_type=jnp.float32), softcap)
    cols = start + jnp.arange(chunk)
    fresh = cols >= k * chunk
    onehot = (cols == labels[..., None]) & fresh
    return jnp.where(fresh, logits, -jnp.inf), onehot, start


def _forward_chunked(h: jax.Array, w: jax.Array, labels: jax.Array, chunk: int, softcap: float | None):
    """(label logit, log sum_v exp(logit_v)), both [B, C] float32, by an online max/sum over
    vocab chunks; the label logit is picked from the chunk that holds it (no gather of w)."""
    n_chunks = -(-w.shape[1] // chunk)

    def body(carry, k):
        m, s, label_logit = carry
        logits, onehot, _ = _chunk_logits(h, w, labels, k, chunk, softcap)
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        label_logit = label_logit + jnp.where(onehot, logits, 0.0).sum(-1)
        return (m_new, s, label_logit), None

    shape = h.shape[:-1]
    zeros = jnp.zeros(shape, jnp.float32)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), zeros, zeros)
    (m, s, label_logit), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return label_logit, m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _label_logps(h: jax.Array, w: jax.Array, labels: jax.Array, chunk: int,
                 softcap: float | None) -> jax.Array:
    label_logit, lse = _forward_chunked(h, w, labels, chunk, softcap)
    return label_logit - lse


def _label_logps_fwd(h, w, labels, chunk, softcap):
    label_logit, lse = _forward_chunked(h, w, labels, chunk, softcap)
    return label_logit - lse, (h, w, labels, lse)


def _label_logps_bwd(chunk, softcap, residuals, g):
    """d log p(label) / d logit_v = 1[v = label] - softmax_v, applied chunk by chunk: the
    logits are recomputed, and dh, dw are chunk-local matmuls (no scatter into dw). Under
    a soft-cap c the logit z_v is c tanh(u_v / c), and dz/du = 1 - (z / c)^2."""
    h, w, labels, lse = residuals
    g = g.astype(jnp.float32)
    n_chunks = -(-w.shape[1] // chunk)

    def body(carry, k):
        dh, dw = carry
        logits, onehot, start = _chunk_logits(h, w, labels, k, chunk, softcap)
        dlogits = onehot.astype(jnp.float32) - jnp.exp(logits - lse[..., None])
        if softcap is not None:  # earlier chunks' columns (-inf) have dlogits 0 already
            dlogits = dlogits * (1.0 - jnp.square(jnp.where(jnp.isfinite(logits), logits, 0.0) / softcap))
        gp = (g[..., None] * dlogits).astype(h.dtype)  # [B, C, chunk]
        w_c = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
        dh = dh + jnp.einsum("bcv,dv->bcd", gp, w_c, preferred_element_type=jnp.float32)
        dw_c = jnp.einsum("bcd,bcv->dv", h, gp, preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(dw, start, chunk, axis=1)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dw_c, start, axis=1)
        return (dh, dw), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_label_logps.defvjp(_label_logps_fwd, _label_logps_bwd)


def token_logps_from_hidden(hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, *,
                            vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                            softcap: float | None = None) -> jax.Array:
    """log softmax(hidden @ lm_head)[label] per position, without [B, C, V] float32 logits.

    Args:
      hidden: [B, C, D] hidden states that predict `labels` (any float dtype).
      lm_head: [D, V] output projection; cast to `hidden.dtype` for the matmuls.
      labels: int [B, C] token ids to score.
      vocab_chunk: columns of the head per chunk; clipped to V.
      softcap: the model's final-logit soft-cap c (logits c * tanh(z / c)), or None.

    Returns:
      float32 [B, C] token log-probs (not masked).
    """
    chunk = max(1, min(int(vocab_chunk), lm_head.shape[1]))
    softcap = None if softcap is None else float(softcap)
    return _label_logps(hidden, lm_head.astype(hidden.dtype), labels.astype(jnp.int32), chunk, softcap)


class CompletionLogps(NamedTuple):
    """Per-token results of one forward over (prompt, completion) pairs.

    token_logps: float32 [B, C], log pi(y_j | x, y_<j), 0 on completion padding.
    mask:        float32 [B, C], 1 on real completion tokens.
    hidden:      [B, C, D] hidden states that predicted each completion token (for
                 the offline-PPO value head).
    router:      float32 [2] for a mixture of experts whose load-balancing loss is on
                 (`router_aux_loss_coef` > 0): that loss over the whole forward's real
                 tokens, and it times the coefficient (`kto_jax.models.moe.router_loss`);
                 else None.
    """
    token_logps: jax.Array
    mask: jax.Array
    hidden: jax.Array
    router: jax.Array | None = None

    @property
    def logps(self) -> jax.Array:
        """float32 [B]: log pi(y|x), the sum over real completion tokens."""
        return self.token_logps.sum(-1)

    @property
    def token_counts(self) -> jax.Array:
        """float32 [B]: number of real completion tokens."""
        return self.mask.sum(-1)


def left_aligned(prompt_ids: jax.Array, prompt_mask: jax.Array, completion_ids: jax.Array,
                 completion_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """concat(prompt, completion) with each row rotated left by its prompt padding.

    A left-padded prompt [B, P] and a right-padded completion [B, C] put padding on
    both sides of a row's real tokens, which only a [B, 1, T, T] attention mask can
    express. Rotated, every row is its real prompt, its real completion, then all of
    its padding: causal attention alone is then exact for every real query (its keys
    are all real), so the model runs mask-free (cuDNN flash attention on GPUs,
    kto_jax/models/transformer.py `resolve_attention_impl`).

    Returns:
      (ids, mask) int [B, P + C], and first int32 [B]: the position of each row's first
      completion token, i.e. its real prompt length (prompts need at least one token).
    """
    t = prompt_ids.shape[1] + completion_ids.shape[1]
    first = prompt_mask.astype(jnp.int32).sum(-1)
    pad = prompt_ids.shape[1] - first                     # left padding of each row
    index = (jnp.arange(t, dtype=jnp.int32)[None] + pad[:, None]) % t
    ids = jnp.take_along_axis(jnp.concatenate([prompt_ids, completion_ids], 1), index, 1)
    mask = jnp.take_along_axis(jnp.concatenate([prompt_mask, completion_mask], 1), index, 1)
    return ids, mask, first


def completion_logps(model, prompt_ids: jax.Array, prompt_mask: jax.Array,
                     completion_ids: jax.Array, completion_mask: jax.Array, *,
                     vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> CompletionLogps:
    """Runs the model on concat(prompt, completion) and scores the completion tokens.

    Args:
      model: a kto_jax causal LM with `hidden_states(ids, positions, mask)` -> [B, T, D]
        and `lm_head_weight()` -> [D, V].
      prompt_ids, prompt_mask: int [B, P], left-padded (the last column is a real token).
      completion_ids, completion_mask: int [B, C], right-padded.
      vocab_chunk: vocabulary columns per LM-head chunk.

    Returns:
      CompletionLogps with [B, C] token log-probs, mask and hidden states.
    """
    c = completion_ids.shape[1]
    ids, mask, first = left_aligned(prompt_ids, prompt_mask, completion_ids, completion_mask)
    hidden, router = hidden_and_router(model, ids, positions_from_mask(mask), mask)  # causal only
    # Completion token j is predicted by the hidden state at position first + j - 1.
    hidden = jax.vmap(lambda h, s: jax.lax.dynamic_slice_in_dim(h, s, c, axis=0))(
        hidden, first - 1)  # [B, C, D]
    cmask = completion_mask.astype(jnp.float32)
    tok = token_logps_from_hidden(hidden, model.lm_head_weight(), completion_ids,
                                  vocab_chunk=vocab_chunk, softcap=model.config.final_logit_softcap)
    return CompletionLogps(jnp.where(cmask > 0, tok, 0.0), cmask, hidden, router)


def hidden_and_router(model, ids: jax.Array, positions: jax.Array, real: jax.Array,
                      packed=None, kl_rows=None) -> tuple[jax.Array, jax.Array | None]:
    """(hidden states, `moe.router_loss` [2] over the `real` tokens, or None): the router's
    loss only for a mixture of experts with `router_aux_loss_coef` > 0. Attention is
    causal alone (or follows `packed`, with its `kl_rows` stream: hidden is then the pair
    of `Transformer.hidden_states`): `real` weighs the tokens the loss counts."""
    cfg = model.config
    kw = {} if kl_rows is None else {"kl_rows": kl_rows}
    if not (cfg.num_experts and cfg.router_aux_loss_coef > 0):
        return model.hidden_states(ids, positions, None, packed=packed, **kw), None
    hidden, stats = model.hidden_states(ids, positions, None, packed=packed, router_weight=real,
                                        **kw)
    return hidden, router_loss(stats, cfg)


def sequence_logps(model, prompt_ids: jax.Array, prompt_mask: jax.Array,
                   completion_ids: jax.Array, completion_mask: jax.Array, *,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> tuple[jax.Array, jax.Array]:
    """float32 log pi(y|x) [B] and completion token counts [B]; see `completion_logps`."""
    out = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                           vocab_chunk=vocab_chunk)
    return out.logps, out.token_counts
