"""Completion log-probs of both completions of packed [x | y | y2] rows, from one forward.

The packed counterpart of kto_jax/models/logprobs.py (`completion_logps`). The rows come
from kto_jax/data/packing.py: several examples per row, each its prompt x once,
its completion y, and a second completion y2 of the same prompt (y_kl for the
unpaired losses, y_l for the paired ones). One forward of the rows gives the
hidden states of every token; the hidden state predicting token j of y or y2 is
gathered per example by the packer's `{name}_index` ([M, C], group-local flat
indices into the rows), and only those [M, C] states go through the vocabulary-
chunked LM head (`token_logps_from_hidden`): no [rows, T, V] float32 logits.

The result is per example, in the shapes of the padded path ([M, C] token
log-probs, mask, hidden states), so the losses read it unchanged; within float
rounding it equals `completion_logps` on the padded (x, y) and (x, y2) batches.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from kto_jax.models.logprobs import (
    DEFAULT_VOCAB_CHUNK, CompletionLogps, hidden_and_router, token_logps_from_hidden)
from kto_jax.batch import KL_ROW_KEYS, PAIRED_NAMES, UNPAIRED_NAMES
from kto_jax.models.packed_attention import BRANCH_PROMPT, BRANCH_SECOND, KlRows, PackedLayout

Array = jax.Array


def packed_layout(batch: Mapping[str, Array]) -> PackedLayout:
    """The attention layout of a packed microbatch (keys of kto_jax/data/packing.py)."""
    return PackedLayout(batch["packed_segment_ids"], batch["packed_branch_ids"],
                        batch["packed_positions"])


def gather_hidden(hidden: Array, index: Array, groups: int) -> Array:
    """hidden [R, T, D] of packed rows -> [M, C, D] at group-local flat indices index [M, C].

    The rows and the examples are both cut into `groups` equal contiguous blocks
    (kto_jax/data/packing.py); example block g reads only row block g, so with rows
    and examples sharded alike over the batch axes the gather stays on each shard.
    """
    r, t, d = hidden.shape
    m, c = index.shape
    rows = hidden.reshape(groups, (r // groups) * t, d)
    picked = jax.vmap(lambda h, i: jnp.take(h, i, axis=0))(rows, index.reshape(groups, -1))
    return picked.reshape(m, c, d)


def kl_rows_of(batch: Mapping[str, Array]) -> KlRows | None:
    """The kl stream of a packed microbatch (kto_jax/data/packing.py `pack_streams`), or None."""
    if KL_ROW_KEYS[0] not in batch:
        return None
    return KlRows(*(batch[k] for k in KL_ROW_KEYS))


def router_weights(layout: PackedLayout, names: tuple[str, ...]) -> Array:
    """float32 [R, T]: each token's weight in the load-balancing loss, the count of the padded
    forwards (kto_jax/step/stats.py): unpaired, the policy forward of (x, y) with gradient
    (y2 = y_kl not counted); paired, the rows (x, y_w) and (x, y_l), so x counts twice."""
    seg, branch, _ = layout
    real = (seg > 0).astype(jnp.float32)
    if names == PAIRED_NAMES:
        return real * (1.0 + (branch == BRANCH_PROMPT))
    return real * (branch != BRANCH_SECOND)


def packed_completion_logps(model, batch: Mapping[str, Array], names: tuple[str, str], *,
                            groups: int = 1, vocab_chunk: int = DEFAULT_VOCAB_CHUNK
                            ) -> tuple[CompletionLogps, CompletionLogps]:
    """One forward of the packed rows; the log-probs of y and of y2 for every example.

    Args:
      model: a kto_jax Transformer (`hidden_states(..., packed=layout)`, `lm_head_weight()`).
      batch: one packed microbatch: packed_ids, packed_positions, packed_segment_ids,
        packed_branch_ids [R, T]; {name}_ids, {name}_mask, {name}_index [M, C] per name;
        with the kl stream (unpaired, `pack_streams`) kl_row_ids, kl_row_positions,
        kl_row_segment_ids [R, Tk] too: y_kl is then computed without gradient (its
        log-probs are constants for autodiff; the losses never differentiate them).
      names: ("completion", "kl") for unpaired losses, ("chosen", "rejected") for pairs.
      groups: packing groups of the batch (kto_jax/data/packing.py).
      vocab_chunk: vocabulary columns per LM-head chunk.
    Returns:
      (CompletionLogps of y, CompletionLogps of y2), each [M, C] as in kto_jax/models/logprobs.py;
      the router statistics (a mixture of experts) ride with y.
    """
    layout, kl = packed_layout(batch), kl_rows_of(batch)
    hidden, router = hidden_and_router(model, batch["packed_ids"], layout.positions,
                                       router_weights(layout, names), packed=layout,
                                       kl_rows=kl)
    if kl is not None:
        return _stream_logps(model, hidden, batch, groups, vocab_chunk, router)
    m = batch[f"{names[0]}_index"].shape[0]
    index = jnp.concatenate([batch[f"{n}_index"] for n in names], axis=0)       # [2M, C]
    labels = jnp.concatenate([batch[f"{n}_ids"] for n in names], axis=0)
    mask = jnp.concatenate([batch[f"{n}_mask"] for n in names], axis=0).astype(jnp.float32)
    # both halves of each group together, so the gather stays within the group
    h = gather_hidden(hidden, _by_group(index, groups), groups)
    h = _by_group(h, groups, inverse=True)                                     # [2M, C, D]
    tok = token_logps_from_hidden(h, model.lm_head_weight(), labels, vocab_chunk=vocab_chunk,
                                  softcap=model.config.final_logit_softcap)
    out = (jnp.where(mask > 0, tok, 0.0), mask, h)
    return CompletionLogps(*(x[:m] for x in out), router), CompletionLogps(*(x[m:] for x in out))


def _stream_logps(model, hidden: tuple[Array, Array], batch: Mapping[str, Array], groups: int,
                  vocab_chunk: int, router) -> tuple[CompletionLogps, CompletionLogps]:
    """y's log-probs from the main rows; y_kl's, without gradient, from the group's main rows
    then kl rows (kl_index: `pack_streams`)."""
    main, kl = hidden
    softcap = model.config.final_logit_softcap
    w = model.lm_head_weight()
    out = []
    for name, rows, weight in (
            (UNPAIRED_NAMES[0], main, w),
            (UNPAIRED_NAMES[1], _main_then_kl(jax.lax.stop_gradient(main), kl, groups),
             jax.lax.stop_gradient(w))):
        h = gather_hidden(rows, batch[f"{name}_index"], groups)                # [M, C, D]
        mask = batch[f"{name}_mask"].astype(jnp.float32)
        tok = token_logps_from_hidden(h, weight, batch[f"{name}_ids"], vocab_chunk=vocab_chunk,
                                      softcap=softcap)
        out.append((jnp.where(mask > 0, tok, 0.0), mask, h))
    return CompletionLogps(*out[0], router), CompletionLogps(*out[1])


def _main_then_kl(main: Array, kl: Array, groups: int) -> Array:
    """[R, T, D] and [R, Tk, D] -> [G, 1, (R/G) (T + Tk), D]-shaped rows for `gather_hidden`:
    each group's main rows flattened, then its kl rows."""
    r, t, d = main.shape
    both = jnp.concatenate([main.reshape(groups, -1, d), kl.reshape(groups, -1, d)], axis=1)
    return both.reshape(r, -1, d)


def _by_group(x: Array, groups: int, inverse: bool = False) -> Array:
    """[2M, ...] (y rows then y2 rows) <-> group-major order [G, 2, M/G, ...] flattened."""
    rest = x.shape[1:]
    if inverse:
        return x.reshape((groups, 2, -1) + rest).swapaxes(0, 1).reshape((-1,) + rest)
    return x.reshape((2, groups, -1) + rest).swapaxes(0, 1).reshape((-1,) + rest)
