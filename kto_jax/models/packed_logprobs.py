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
from kto_jax.models.packed_attention import PackedLayout

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


def packed_completion_logps(model, batch: Mapping[str, Array], names: tuple[str, str], *,
                            groups: int = 1, vocab_chunk: int = DEFAULT_VOCAB_CHUNK
                            ) -> tuple[CompletionLogps, CompletionLogps]:
    """One forward of the packed rows; the log-probs of y and of y2 for every example.

    Args:
      model: a kto_jax Transformer (`hidden_states(..., packed=layout)`, `lm_head_weight()`).
      batch: one packed microbatch: packed_ids, packed_positions, packed_segment_ids,
        packed_branch_ids [R, T]; {name}_ids, {name}_mask, {name}_index [M, C] per name.
      names: ("completion", "kl") for unpaired losses, ("chosen", "rejected") for pairs.
      groups: packing groups of the batch (kto_jax/data/packing.py).
      vocab_chunk: vocabulary columns per LM-head chunk.
    Returns:
      (CompletionLogps of y, CompletionLogps of y2), each [M, C] as in kto_jax/models/logprobs.py.
    """
    layout = packed_layout(batch)
    hidden, router = hidden_and_router(model, batch["packed_ids"], layout.positions,
                                       layout.segment_ids > 0, packed=layout)
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
    # the router statistics are the whole forward's: they ride with y
    return CompletionLogps(*(x[:m] for x in out), router), CompletionLogps(*(x[m:] for x in out))


def _by_group(x: Array, groups: int, inverse: bool = False) -> Array:
    """[2M, ...] (y rows then y2 rows) <-> group-major order [G, 2, M/G, ...] flattened."""
    rest = x.shape[1:]
    if inverse:
        return x.reshape((groups, 2, -1) + rest).swapaxes(0, 1).reshape((-1,) + rest)
    return x.reshape((2, groups, -1) + rest).swapaxes(0, 1).reshape((-1,) + rest)
