"""A mixture-of-experts MLP block (Qwen3-MoE, Mixtral): router, top-k, SwiGLU experts.

Every token goes to exactly its k experts, none is dropped (no capacity factor), so
the block computes what transformers computes, up to float rounding:

    probs   = softmax(x W_router)                     (float32, over all E experts)
    w, e    = top_k(probs, k)                          the chosen experts and their probs
    w       = w / sum(w)   where the family renormalises (Mixtral always, Qwen3-MoE with
                           norm_topk_prob; this is the softmax over the chosen experts' logits)
    y       = sum_j w_j * down_e_j(act(gate_e_j(x)) * up_e_j(x))

The experts' matmuls are grouped (`moe_impl` "ragged", the default): the N*k
(token, expert) assignments are sorted by expert, their tokens gathered into one
[N*k, D] array, and each expert multiplies only its own contiguous rows with
`jax.lax.ragged_dot` (on TPU a grouped matmul; elsewhere jax lowers it as a masked
dense product). The outputs are gathered back to token order and summed with the
router weights. `moe_impl` "blocks" does the same with `blocked_matmul` (each expert's
rows padded to blocks of 128, one batched matmul), which off TPU, where jax lowers
ragged_dot as a masked dense product, is the faster grouped form. On a mesh each batch
shard does this for its own tokens (a shard_map over the batch axes). With the experts
sharded over a mesh axis that also splits the batch (config.mesh.expert > 1), each
device keeps its experts and the assignments travel to the experts' devices and back
by all-to-alls (`expert_parallel`); otherwise the layer's expert weights are gathered,
as fsdp gathers a dense layer's. `moe_impl` "dense" runs every expert on every token and
zero-weights the unchosen ones: the same result, E/k times the expert FLOPs; it is the reference
the tests and scripts/moe_benchmark.py compare the grouped form against.

LoRA on the experts (`EXPERT_ADAPTERS`, kto_jax.models.lora) is applied in the same
products: each assignment's rows times its expert's A, then B, two more grouped matmuls
of width r beside each projection's (no per-expert dense delta W_e + A_e B_e is formed).

`router_stats` gives what the load-balancing loss needs of one layer (the share of
assignments and the mean router probability of each expert, over real tokens);
`load_balancing_loss` is transformers' `load_balancing_loss_func` (Switch Transformer
eq. 4-6) over all layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kto_jax.models.layers import ACT_EMBED, ACTIVATIONS, MlpBlock, dense, layer_weight
from kto_jax.sharding import constrain, current_spec

Array = jax.Array
MOE_IMPLS = ("ragged", "blocks", "dense")
EXPERT_PARAMS = ("expert_gate_proj", "expert_up_proj", "expert_down_proj")
# LoRA on the experts (kto_jax.models.lora, EXPERT_TARGETS): adapter -> the parameters whose
# output columns its B spans (gate and up share one A, as PEFT's adapter of the fused
# gate_up_proj). A layer's p then holds `{adapter}_lora_a` [E, in, r], `_lora_b` [E, r, out].
EXPERT_ADAPTERS = {"expert_gate_up_proj": ("expert_gate_proj", "expert_up_proj"),
                   "expert_down_proj": ("expert_down_proj",)}


def route(p: dict[str, Array], x: Array, cfg: Any) -> tuple[Array, Array, Array]:
    """(router logits [N, E] in x's dtype, weights [N, k] in x's dtype, experts int32 [N, k])
    of tokens x [N, D]: the top-k of the float32 softmax, renormalised where the family does."""
    logits = dense("nd,de->ne", x, p, "router")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return logits, weights.astype(x.dtype), experts.astype(jnp.int32)


def grouped_outputs(p: dict[str, Array], x: Array, experts: Array, weights: Array, cfg: Any) -> Array:
    """sum_j weights[:, j] * expert_{experts[:, j]}(x), [N, D]: assignments sorted by expert,
    each expert's rows multiplied by its weights alone (`jax.lax.ragged_dot`)."""
    n, k = experts.shape
    flat = experts.reshape(-1)                                     # [N*k] expert of each assignment
    order = jnp.argsort(flat, stable=True)                         # assignments grouped by expert
    sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)                         # [N*k, D] token of each assignment
    return _combine(expert_rows(p, rows, sizes, cfg), order, weights)


def expert_rows(p: dict[str, Array], rows: Array, sizes: Array, cfg: Any) -> Array:
    """The SwiGLU experts (and their LoRA adapters) of rows [M, D] sorted by expert: the
    first sizes[0] rows through p's expert 0, the next sizes[1] through expert 1, ...;
    rows past sum(sizes) give zeros ("ragged") or values to be dropped ("blocks")."""
    dt = rows.dtype
    matmul = blocked_matmul if cfg.moe_impl == "blocks" else jax.lax.ragged_dot
    gate = matmul(rows, layer_weight(p, "expert_gate_proj", dt), sizes)
    up = matmul(rows, layer_weight(p, "expert_up_proj", dt), sizes)
    delta = _adapter_term(lambda x, w: matmul(x, w, sizes), rows, p, "expert_gate_up_proj")
    if delta is not None:
        gate, up = gate + delta[:, :gate.shape[-1]], up + delta[:, gate.shape[-1]:]
    hidden = ACTIVATIONS[cfg.hidden_act](gate) * up
    out = matmul(hidden, layer_weight(p, "expert_down_proj", dt), sizes)
    delta = _adapter_term(lambda x, w: matmul(x, w, sizes), hidden, p, "expert_down_proj")
    return out if delta is None else out + delta


def _unsort(order: Array) -> Array:
    """The inverse permutation of `order`."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _combine(out: Array, order: Array, weights: Array) -> Array:
    """Outputs [N*k, D] of the assignments in `order` back to (token, choice) order, summed
    with the router weights [N, k] -> [N, D]."""
    n, k = weights.shape
    out = jnp.take(out, _unsort(order), axis=0).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", out, weights)


def _adapter_term(matmul: Any, x: Array, p: dict[str, Array], adapter: str) -> Array | None:
    """(x A_e) (scale B_e) with each row's (or each expert's) own factors, in x's dtype, by
    `matmul(x, w [E, ...])`, the same grouped/per-expert product as the base weights'
    (two more of width r: no per-expert delta is formed); None without the adapter."""
    if adapter + "_lora_a" not in p:
        return None
    a, b = (p[adapter + suffix].astype(x.dtype) for suffix in ("_lora_a", "_lora_b"))
    return matmul(matmul(x, a), b)


BLOCK_ROWS = 128  # rows per block of `blocked_matmul`


def blocked_matmul(rows: Array, w: Array, sizes: Array, block: int = BLOCK_ROWS) -> Array:
    """`jax.lax.ragged_dot(rows, w, sizes)` as a batched matmul of fixed-size blocks: each
    expert's rows are padded to a multiple of `block`, every block multiplied by its one
    expert's weight, the padding dropped. At most E * (block - 1) padded rows of work
    besides the real ones, whatever the platform (off TPU, jax lowers ragged_dot as a
    masked product of every group against every row)."""
    m, e = rows.shape[0], w.shape[0]
    num_blocks = -(-(m + e * (block - 1)) // block)                      # a static bound
    padded = -(-sizes // block) * block
    padded_start, start = jnp.cumsum(padded) - padded, jnp.cumsum(sizes) - sizes
    expert = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=m)     # of each sorted row
    dest = padded_start[expert] + jnp.arange(m) - start[expert]          # its slot among the blocks
    slots = jnp.zeros((num_blocks * block, rows.shape[1]), rows.dtype).at[dest].set(rows)
    block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * block,
                                                side="right"), e - 1)
    out = jnp.einsum("bmd,bdf->bmf", slots.reshape(num_blocks, block, -1), jnp.take(w, block_expert, axis=0))
    return jnp.take(out.reshape(num_blocks * block, -1), dest, axis=0)


def dense_outputs(p: dict[str, Array], x: Array, experts: Array, weights: Array, cfg: Any) -> Array:
    """The same as `grouped_outputs`, with every expert run on every token ([E, N, F])."""
    dt = x.dtype
    gate = jnp.einsum("nd,edf->enf", x, layer_weight(p, "expert_gate_proj", dt))
    up = jnp.einsum("nd,edf->enf", x, layer_weight(p, "expert_up_proj", dt))
    per_expert = lambda h, w: jnp.einsum("nd,edf->enf" if h.ndim == 2 else "end,edf->enf", h, w)
    delta = _adapter_term(per_expert, x, p, "expert_gate_up_proj")
    if delta is not None:
        gate, up = gate + delta[..., :gate.shape[-1]], up + delta[..., gate.shape[-1]:]
    hidden = ACTIVATIONS[cfg.hidden_act](gate) * up
    out = jnp.einsum("enf,efd->end", hidden, layer_weight(p, "expert_down_proj", dt))
    delta = _adapter_term(per_expert, hidden, p, "expert_down_proj")
    out = out if delta is None else out + delta
    combine = jnp.einsum("nke,nk->ne", jax.nn.one_hot(experts, cfg.num_experts, dtype=dt), weights)
    return jnp.einsum("end,ne->nd", out, combine)


def moe_mlp(p: dict[str, Array], x: Array, cfg: Any) -> Array:
    """The mixture-of-experts MLP of x [B, T, D] -> [B, T, D] (see the module docstring)."""
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    _, weights, experts = route(p, tokens, cfg)
    if cfg.moe_impl == "dense":
        out = dense_outputs(p, tokens, experts, weights, cfg)
    else:
        out = per_batch_shard(p, tokens, experts, weights, cfg)
    return constrain(out.reshape(b, t, d), ACT_EMBED)


def per_batch_shard(p: dict[str, Array], tokens: Array, experts: Array, weights: Array, cfg: Any) -> Array:
    """The experts' outputs of each batch shard's own tokens: on a mesh (the model traced under
    sharding rules), a shard_map over the batch axes, so no device sorts the whole batch.
    When the experts are sharded over a mesh axis that also splits the batch (config.mesh.expert
    > 1), each device keeps its E / ep experts and the tokens travel (`expert_parallel`);
    otherwise every device multiplies its own assignments with the layer's expert weights
    gathered (as fsdp gathers a dense layer's). Without a mesh, the plain call."""
    spec = current_spec(("batch",), tokens.shape[:1])
    if spec is None or spec == PartitionSpec(None):
        return grouped_outputs(p, tokens, experts, weights, cfg)
    w = {name: layer_weight(p, name, tokens.dtype) for name in EXPERT_PARAMS}
    w.update({name: p[name] for name in p if name.startswith(tuple(EXPERT_ADAPTERS)) and "_lora_" in name})
    axis = _expert_axis(spec, cfg)
    if axis is None:
        fn, w_spec = grouped_outputs, PartitionSpec()
    else:
        fn, w_spec = functools.partial(expert_parallel, axis=axis), PartitionSpec(axis)
    local = jax.shard_map(lambda w, *rows: fn(w, *rows, cfg), check_vma=False,
                          in_specs=(w_spec, spec, spec, spec), out_specs=spec)
    return local(w, tokens, experts, weights)


def _expert_axis(batch_spec: PartitionSpec, cfg: Any) -> str | None:
    """The mesh axis (of size > 1) that shards the experts and also splits the batch, or None."""
    spec = current_spec(("expert",), (cfg.num_experts,))
    axis = None if spec is None else spec[0]
    batch = batch_spec[0] if isinstance(batch_spec[0], tuple) else (batch_spec[0],)
    if not isinstance(axis, str) or axis not in batch:
        return None
    return axis if jax.sharding.get_abstract_mesh().shape[axis] > 1 else None


def expert_parallel(w: dict[str, Array], x: Array, experts: Array, weights: Array, cfg: Any,
                    axis: str) -> Array:
    """`grouped_outputs` with the experts split over the mesh axis `axis` (inside a shard_map:
    w holds this device's E / ep experts, x [n, D] its tokens). The n k assignments are
    sorted by expert, so by owner device; each goes in its owner's slot of a send buffer
    [ep, n k, D] (dropless: all n k could go to one device), an all-to-all over `axis`
    delivers them, the owner runs its experts on the [ep n k, D] rows it received (sorted
    again by local expert; empty slots fall past the groups), the inverse all-to-all
    returns the results, and they are combined with the router weights here."""
    n, k = experts.shape
    ep = jax.lax.axis_size(axis)
    local = cfg.num_experts // ep
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)                         # assignments grouped by expert
    expert = jnp.take(flat, order)
    rows = jnp.take(x, order // k, axis=0)                         # [n k, D]
    dest = expert // local                                         # the device owning each expert
    counts = jnp.bincount(dest, length=ep)
    slot = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[dest]  # its place in dest's buffer
    send = jnp.zeros((ep, n * k, x.shape[1]), x.dtype).at[dest, slot].set(rows)
    send_expert = jnp.full((ep, n * k), local, jnp.int32).at[dest, slot].set(expert % local)
    recv = jax.lax.all_to_all(send, axis, 0, 0).reshape(ep * n * k, -1)   # [sender, slot] rows
    recv_expert = jax.lax.all_to_all(send_expert, axis, 0, 0).reshape(-1)  # `local`: an empty slot
    by_expert = jnp.argsort(recv_expert, stable=True)
    sizes = jnp.bincount(recv_expert, length=local + 1)[:local].astype(jnp.int32)
    out = expert_rows(w, jnp.take(recv, by_expert, axis=0), sizes, cfg)
    out = jnp.take(out, _unsort(by_expert), axis=0).reshape(ep, n * k, -1)
    back = jax.lax.all_to_all(out, axis, 0, 0)                     # [owner, slot]: our rows' outputs
    return _combine(back[dest, slot], order, weights)


MOE_MLP = MlpBlock(
    shapes=lambda cfg: {"router": (cfg.hidden_size, cfg.num_experts),
                        "expert_gate_proj": (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size),
                        "expert_up_proj": (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size),
                        "expert_down_proj": (cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size)},
    axes={"router": ("embed", None), "expert_gate_proj": ("expert", "embed", "mlp"),
          "expert_up_proj": ("expert", "embed", "mlp"), "expert_down_proj": ("expert", "mlp", "embed")},
    apply=moe_mlp,
)


# ---- the router's load-balancing loss ----

def router_stats(p: dict[str, Array], x: Array, cfg: Any, token_weight: Array) -> Array:
    """float32 [2, E] of one layer's MLP input x [B, T, D]: the sum over real tokens
    (token_weight [B, T], 1 real, 0 padding) of each expert's top-k assignments, and of
    its router probability; `load_balancing_loss` divides by the token count."""
    b, t, d = x.shape
    logits, _, experts = route(p, x.reshape(b * t, d), cfg)
    w = token_weight.reshape(b * t).astype(jnp.float32)
    chosen = jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.float32).sum(1)   # [N, E]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.stack([w @ chosen, w @ probs])


def load_balancing_loss(stats: Array, tokens: Array, num_experts: int) -> Array:
    """E * sum_e f_e P_e (Switch Transformer eq. 4), as transformers' load_balancing_loss_func:
    stats [L, 2, E] from `router_stats` summed over layers, f_e = assignments / (L * tokens),
    P_e = probability mass / (L * tokens); tokens = the real tokens of the batch."""
    total = stats.shape[0] * tokens
    assigned, mass = stats.sum(0) / total
    return num_experts * jnp.sum(assigned * mass)


def router_loss(stats: Array, cfg: Any) -> Array:
    """float32 [2]: the load-balancing loss of one forward's router statistics [L, 2, E] (its
    real tokens: each made k assignments), and that times `router_aux_loss_coef`, the term
    a training loss adds."""
    tokens = stats[0, 0].sum() / cfg.num_experts_per_tok
    aux = load_balancing_loss(stats, jnp.maximum(tokens, 1.0), cfg.num_experts)
    return jnp.stack([aux, cfg.router_aux_loss_coef * aux])
