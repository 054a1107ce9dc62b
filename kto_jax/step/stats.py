"""From one microbatch to the `stats` a HALO loss reads: the forwards of the train step.

Pure functions, called inside the jitted step (kto_jax/step/train_step.py) once per
microbatch. A microbatch is the batch of kto_jax/batch.py without its leading
accumulation axis: arrays [M, ...], M sharded over ('data', 'fsdp').

What runs, per microbatch (section 4.1 of the paper; docs/design.md, "The data path"):
- the policy on (x_i, y_i), with gradient;
- the KL batch (x_i, y_{i+1 mod M}): the completion arrays rolled by one along M,
  built ONCE here and given to the policy and the reference alike;
- the policy on the KL batch with `stop_gradient` on its PARAMETERS, so autodiff
  sees constants and no backward pass is built for it;
- the frozen reference on (x, y) and (x, y_kl) in one forward of 2M rows
  (`reference_logps`, which `kto-jax precompute-ref` runs too), unless its
  log-probs are precomputed in the batch or the loss is reference-free;
- for a loss with a value head (offline PPO), that head on the policy's (detached)
  hidden states.

Two completions of the same prompts go through one forward by interleaving them
along M ([M, 2, ...] -> [2M, ...]), which keeps every row on the device that owns
its prompt under the M sharding.

Packed microbatches (data.packing; kto_jax/data/packing.py, kto_jax/batch.py) carry rows
[R, T] of whole examples [x | y | y2] instead of padded prompts: y2 is the KL
completion y_{i+1 mod M} (rolled by the packer within the microbatch, as
`kl_completions` does here) or the rejected y_l of a pair. Then ONE policy forward
of the rows gives log pi(y|x) with gradient and log pi(y_kl|x) under
`stop_gradient` (z0 carries no gradient, as with the frozen-parameter KL forward
of the padded path), and ONE reference forward gives both reference log-probs:
x is computed once per forward (`forward_pair`). The per-example results have the
padded path's shapes, so the assembly of `stats` below is shared by both layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from kto_jax.batch import (PAIRED_NAMES, PRECOMPUTED_PAIRED_KEYS, UNPAIRED_NAMES, is_packed,
                           kl_pair_valid, kl_partners)
from kto_jax.errors import UserError
from kto_jax.models.logprobs import DEFAULT_VOCAB_CHUNK, CompletionLogps, completion_logps
from kto_jax.losses.registry import HaloLoss
from kto_jax.models.packed_logprobs import packed_completion_logps
from kto_jax.step.adapters import model_of

Array = jax.Array
Batch = Mapping[str, Array]


def kl_completions(completion_ids: Array, completion_mask: Array,
                   valid: Array | None = None) -> tuple[Array, Array]:
    """The mismatched completions of the KL pairs: row i gets y_{i+1 mod M}, wrapping
    around the REAL rows (`kto_jax.batch.kl_partners`: filler rows are never a KL completion).

    Args:
      completion_ids, completion_mask: int [M, C], one microbatch (never the full batch,
        so under accumulation every pair stays within its microbatch).
      valid: bool [M], the microbatch's real rows (None: all real, a plain roll).
    """
    if valid is None:
        return jnp.roll(completion_ids, -1, axis=0), jnp.roll(completion_mask, -1, axis=0)
    partners = kl_partners(valid.astype(bool), jnp)
    return jnp.take(completion_ids, partners, axis=0), jnp.take(completion_mask, partners, axis=0)


def _interleave(a: Array, b: Array) -> Array:
    """[M, ...] x 2 -> [2M, ...] with rows a_0, b_0, a_1, b_1, ..."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _deinterleave(x: Array) -> tuple[Array, Array]:
    x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return x[:, 0], x[:, 1]


# config.train.logprob_vocab_chunk=0: the whole vocabulary in one chunk when a forward's
# float32 logits [rows, C, V] take at most this many bytes, else DEFAULT_VOCAB_CHUNK columns
WHOLE_VOCAB_BYTES = 256 * 2 ** 20


def vocab_chunk_for(vocab_chunk: int, positions: int, vocab_size: int) -> int:
    """The LM-head chunk of a forward scoring `positions` completion tokens: `vocab_chunk` when
    set (> 0); else (0, auto) the whole vocabulary if its float32 logits fit WHOLE_VOCAB_BYTES
    (short rows and small batches: one chunk is the fastest, measured 1.2x on CPU for
    SmolLM2's 49k columns), else DEFAULT_VOCAB_CHUNK."""
    if vocab_chunk > 0:
        return int(vocab_chunk)
    if 4 * positions * vocab_size <= WHOLE_VOCAB_BYTES:
        return int(vocab_size)
    return DEFAULT_VOCAB_CHUNK


def forward(graphdef: nnx.GraphDef, params: Any, prompt_ids: Array, prompt_mask: Array,
            completion_ids: Array, completion_mask: Array, vocab_chunk: int) -> CompletionLogps:
    """Completion log-probs of the model of `params` (`adapters.model_of`: the Param state, or
    base + adapters under LoRA); see kto_jax.models.logprobs."""
    model = model_of(graphdef, params)
    chunk = vocab_chunk_for(vocab_chunk, completion_ids.size, model.config.vocab_size)
    return completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                            vocab_chunk=chunk)


def forward_two(graphdef: nnx.GraphDef, params: Any, prompt_ids: Array, prompt_mask: Array,
                ids_a: Array, mask_a: Array, ids_b: Array, mask_b: Array,
                vocab_chunk: int) -> tuple[CompletionLogps, CompletionLogps]:
    """Two completions [M, C] of the same prompts [M, P] in one forward of 2M rows."""
    out = forward(graphdef, params, _interleave(prompt_ids, prompt_ids),
                  _interleave(prompt_mask, prompt_mask), _interleave(ids_a, ids_b),
                  _interleave(mask_a, mask_b), vocab_chunk)
    halves = [_deinterleave(x) for x in out[:3]]
    # the router statistics (a mixture of experts) are the whole forward's: they ride with a
    return (CompletionLogps(*[h[0] for h in halves], out.router),
            CompletionLogps(*[h[1] for h in halves]))


def forward_pair(graphdef: nnx.GraphDef, params: Any, mb: Batch, names: tuple[str, str],
                 vocab_chunk: int, groups: int = 1, second: tuple[Array, Array] | None = None
                 ) -> tuple[CompletionLogps, CompletionLogps]:
    """Log-probs of two completions of the microbatch's prompts, from one forward.

    names: the batch keys' prefixes, ("completion", "kl") or ("chosen", "rejected").
    Packed: one forward of the rows [x | y | y2] (kto_jax/models/packed_logprobs.py; `groups`:
    the packing groups, one per batch shard). Padded: `forward_two` of 2M rows; the
    padded unpaired batch has no "kl_*" keys, so `second` passes (ids, mask) of y2.
    """
    if is_packed(mb):
        model = model_of(graphdef, params)
        chunk = vocab_chunk_for(vocab_chunk, 2 * mb[f"{names[0]}_ids"].size,
                                model.config.vocab_size)
        return packed_completion_logps(model, mb, names, groups=groups, vocab_chunk=chunk)
    ids2, mask2 = second if second is not None else (mb[f"{names[1]}_ids"],
                                                     mb[f"{names[1]}_mask"])
    return forward_two(graphdef, params, mb["prompt_ids"], mb["prompt_mask"],
                       mb[f"{names[0]}_ids"], mb[f"{names[0]}_mask"], ids2, mask2, vocab_chunk)


@dataclasses.dataclass(frozen=True)
class Forwards:
    """What a reference forward computes, in the terms of a `HaloLoss` (which is one too):
    pairs or single completions, with or without the KL pairs and per-token log-probs."""
    paired: bool
    uses_kl: bool
    uses_token_logps: bool = False


# log pi(y|x) of the matched pairs alone: what online rounds compare policy and reference on
MATCHED_ONLY = Forwards(paired=False, uses_kl=False)


def frozen(params: Any) -> Any:
    """The parameters as constants for autodiff: applied BEFORE a no-backward forward."""
    return jax.tree.map(jax.lax.stop_gradient, params)


def reference_keys(loss: HaloLoss | Forwards) -> tuple[str, ...]:
    """The keys of `reference_logps` a loss reads, i.e. what a precomputed batch must carry."""
    if loss.paired:
        return PRECOMPUTED_PAIRED_KEYS
    return ("reference_logps",) + (("reference_kl_logps",) if loss.uses_kl else ())


def reference_logps(loss: HaloLoss | Forwards, graphdef: nnx.GraphDef, reference: Any, mb: Batch,
                    vocab_chunk: int, kl: tuple[Array, Array] | None = None,
                    groups: int = 1) -> dict[str, Array]:
    """The reference forward of one microbatch: float32 [M] log pi_ref per `reference_keys(loss)`.

    Paired: the chosen and rejected completions in one forward. Unpaired: the matched
    (x, y) and, for a loss with z0, the KL pairs (x_i, y_{i+1 mod M}) rolled WITHIN this
    microbatch, in one forward; `kl` passes the rolled completions when the caller has
    built them already. A packed microbatch is one forward of its rows whatever the
    loss (its y2 is already there; `groups`: its packing groups). Per-token log-probs
    [M, C] come too when the loss reads them (`reference_token_logps`). The train step
    and `kto-jax precompute-ref` both call this, so stored values are the ones the step
    would compute, per example whatever the layout.
    """
    ref = frozen(reference)
    if loss.paired:
        chosen, rejected = forward_pair(graphdef, ref, mb, PAIRED_NAMES, vocab_chunk, groups)
        return dict(zip(PRECOMPUTED_PAIRED_KEYS, (chosen.logps, rejected.logps)))
    y, ym = mb["completion_ids"], mb["completion_mask"]
    if loss.uses_kl or is_packed(mb):
        kl = kl if kl is not None or is_packed(mb) else kl_completions(y, ym, mb["valid"])
        matched, mismatched = forward_pair(graphdef, ref, mb, UNPAIRED_NAMES, vocab_chunk,
                                           groups, kl)
    else:
        matched = forward(graphdef, ref, mb["prompt_ids"], mb["prompt_mask"], y, ym, vocab_chunk)
    out = {"reference_logps": matched.logps}
    if loss.uses_kl:
        out["reference_kl_logps"] = mismatched.logps
    if loss.uses_token_logps:
        out["reference_token_logps"] = matched.token_logps
        if loss.uses_kl:  # humanline clamps the KL pairs' tokens too
            out["reference_kl_token_logps"] = mismatched.token_logps
    return out


def _reference_stats(loss: HaloLoss, graphdef: nnx.GraphDef, reference: Any, mb: Batch,
                     reference_source: str, vocab_chunk: int,
                     kl: tuple[Array, Array] | None = None, groups: int = 1) -> dict[str, Array]:
    """The reference stats of a loss that uses them: precomputed in the batch, or forwarded."""
    if reference_source != "precomputed":
        return reference_logps(loss, graphdef, reference, mb, vocab_chunk, kl, groups)
    keys = reference_keys(loss)
    missing = [k for k in keys if k not in mb]
    if missing:
        raise UserError(f"config.reference.source='precomputed' but the batch has no {missing}: "
                        "precompute the reference log-probs in the data (kto_jax/batch.py), or set "
                        "config.reference.source='model'.")
    return {k: mb[k].astype(jnp.float32) for k in keys}


def unpaired_stats(loss: HaloLoss, graphdef: nnx.GraphDef, params: Any, reference: Any,
                   value_head: Any, mb: Batch, *, reference_source: str,
                   vocab_chunk: int, groups: int = 1) -> dict[str, Array]:
    """The stats of an unpaired loss (KTO family, SFT, CSFT, offline PPO) for one microbatch.

    Args:
      params: policy nnx.Param state (differentiated by the caller).
      reference: frozen reference params, or None (precomputed / reference-free).
      value_head: value-head params (offline PPO), else None.
      mb: one microbatch of the unpaired layout, arrays [M, ...], padded or packed.
      groups: packing groups of a packed microbatch (one per batch shard).
    """
    kl = kl_logps = None
    if is_packed(mb):  # one forward: y with gradient, y_kl = y_{i+1 mod M} detached
        pol, pol_kl = forward_pair(graphdef, params, mb, UNPAIRED_NAMES, vocab_chunk, groups)
        pol_kl = CompletionLogps(*(jax.lax.stop_gradient(x) for x in pol_kl))
    else:
        x, xm = mb["prompt_ids"], mb["prompt_mask"]
        y, ym = mb["completion_ids"], mb["completion_mask"]
        pol = forward(graphdef, params, x, xm, y, ym, vocab_chunk)
        if loss.uses_kl:
            kl = kl_completions(y, ym, mb["valid"])  # built once, shared by policy and reference
            pol_kl = forward(graphdef, frozen(params), x, xm, *kl, vocab_chunk)
    valid = mb["valid"].astype(bool)
    stats = {"policy_logps": pol.logps, "policy_token_counts": pol.token_counts,
             "desirable": mb["desirable"].astype(bool), "weight": mb["weight"].astype(jnp.float32),
             "valid": valid, "kl_valid": kl_pair_valid(valid, jnp)}
    if loss.uses_kl:
        stats["policy_kl_logps"] = pol_kl.logps
        if loss.uses_token_logps:  # humanline
            stats["policy_kl_token_logps"] = pol_kl.token_logps
            stats["kl_completion_mask"] = pol_kl.mask
    if loss.uses_reference:
        stats.update(_reference_stats(loss, graphdef, reference, mb, reference_source,
                                      vocab_chunk, kl, groups))
    if loss.uses_token_logps:
        stats["policy_token_logps"] = pol.token_logps
        stats["completion_mask"] = pol.mask
    if loss.uses_value_head:
        stats["values"] = loss.value_head.apply(value_head, pol.hidden)  # detached inside
    return with_router(stats, pol)


def paired_stats(loss: HaloLoss, graphdef: nnx.GraphDef, params: Any, reference: Any,
                 mb: Batch, *, reference_source: str, vocab_chunk: int,
                 groups: int = 1) -> dict[str, Array]:
    """The stats of a paired loss (DPO, IPO, ORPO, SimPO, SLiC) for one microbatch [M, ...],
    padded or packed ([x | y_w | y_l] rows)."""
    chosen, rejected = forward_pair(graphdef, params, mb, PAIRED_NAMES, vocab_chunk, groups)
    stats = {"policy_chosen_logps": chosen.logps, "policy_rejected_logps": rejected.logps,
             "chosen_token_counts": chosen.token_counts,
             "rejected_token_counts": rejected.token_counts, "valid": mb["valid"].astype(bool)}
    if loss.uses_reference:
        stats.update(_reference_stats(loss, graphdef, reference, mb, reference_source,
                                      vocab_chunk, groups=groups))
    return with_router(stats, chosen)


ROUTER_KEY = "router"  # the policy forward's router statistics, read by the step, not the loss


def with_router(stats: dict[str, Array], policy: CompletionLogps) -> dict[str, Array]:
    """`stats` plus the router statistics of the policy forward with gradient (a mixture of
    experts with its load-balancing loss on; kto_jax/models/moe.py), when it has them."""
    if policy.router is not None:
        stats[ROUTER_KEY] = policy.router
    return stats


def matched_tokens(mb: Batch, paired: bool) -> Array:
    """Real tokens of the matched (x, y) sequences of valid rows: the throughput count.

    Paired: x + y_w + x + y_l, the tokens of the two padded sequences. Packed batches
    count the same (their `prompt_length` for x), so the figure does not change with
    the layout even though a packed forward computes x once.
    """
    valid = mb["valid"].astype(jnp.float32)
    if is_packed(mb):
        prompt = mb["prompt_length"].astype(jnp.float32)
    else:
        prompt = mb["prompt_mask"].astype(jnp.float32).sum(-1)
    if paired:
        comp = (mb["chosen_mask"].astype(jnp.float32).sum(-1)
                + mb["rejected_mask"].astype(jnp.float32).sum(-1) + prompt)
    else:
        comp = mb["completion_mask"].astype(jnp.float32).sum(-1)
    return jnp.sum(valid * (prompt + comp))
