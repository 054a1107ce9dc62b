"""FLOP counts of the model and of one train step, and model FLOPs utilisation (MFU).

Conventions (those of the PaLM paper, App. B, which MaxText and most reports use):
- a multiply-add is 2 FLOPs;
- a forward pass costs F(T) = T * (2 * N_matmul + 4 * L * H * hd * T) for a
  sequence of T tokens, where N_matmul counts the parameters of every matmul
  (attention projections, SwiGLU MLP, lm_head; not the embedding lookup; of a
  mixture of experts only the active ones: k experts and the router) and the
  second term is QK^T plus AV over the full T x T score matrix (no causal
  discount, so MFU is comparable with other reports);
- a backward pass costs two forwards; rematerialisation is not counted (model
  FLOPs, not hardware FLOPs).

A step's FLOPs add up, per example, the forwards each loss needs: the policy on
(x, y) with its backward, the policy's KL forward on (x, y_{i+1}) without one,
and the reference forwards (none when the reference is precomputed or absent).

Per example of a KTO step with a reference, in forward-token units (one forward of
one token; a backward is two), for a prompt of P and completions of C tokens:
  padded              policy 3(P + C) + KL (P + C), reference 2(P + C):   6P + 6C
  packed trees        [x | y | y_kl] rows: policy 3(P + 2C), reference P + 2C:
                      4P + 8C (y_kl rides the policy's backward)
  packed + kl stream  main rows [x | y] with backward 3(P + C), kl rows y_kl forward
                      only C (x's keys reused), reference P + 2C:  4P + 6C
(plus the attention's T x T term per row and the rows' padding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Dense bf16 peak FLOP/s per device (per chip for TPUs), from the vendors' data sheets.
# Matched by substring against `jax.devices()[0].device_kind`, first match wins.
PEAK_FLOPS = (
    ("TPU v6", 918e12),        # Trillium (v6e, "TPU v6 lite")
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),        # v5p reports itself as "TPU v5"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),          # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("V100", 125e12),          # fp16 tensor cores (no bf16)
)

@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The sizes that determine a decoder's FLOPs (HF config.json field names in comments)."""
    hidden: int          # hidden_size
    intermediate: int    # intermediate_size
    layers: int          # num_hidden_layers
    heads: int           # num_attention_heads
    kv_heads: int        # num_key_value_heads
    head_dim: int        # head_dim (default hidden_size // num_attention_heads)
    vocab: int           # vocab_size
    experts: int = 0     # num_experts of a mixture of experts (0: a dense MLP of width `intermediate`)
    experts_per_token: int = 0  # num_experts_per_tok: the experts each token runs (each of width
                                # `intermediate` = moe_intermediate_size)
    dense_layers: int = 0        # of a mixture of experts' `layers`, those with a dense MLP instead
    dense_intermediate: int = 0  # (Qwen3-MoE mlp_only_layers / decoder_sparse_step), of this width

    @classmethod
    def of(cls, model_config: Any) -> "ModelDims":
        """The dims of a `kto_jax.models.ModelConfig` (its `flop_dims()`, whatever the family)."""
        return cls(**model_config.flop_dims())

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelDims":
        """Reads a transformers config (object or config.json dict)."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        heads = int(get("num_attention_heads"))
        head_dim = get("head_dim", None) or int(get("hidden_size")) // heads
        experts = int(get("num_local_experts", None) or get("num_experts", None) or 0)
        width = (experts and get("moe_intermediate_size", None)) or get("intermediate_size")
        layers, step = int(get("num_hidden_layers")), int(get("decoder_sparse_step", None) or 1)
        only = set(get("mlp_only_layers", None) or ())
        dense = sum(i in only or (i + 1) % step != 0 for i in range(layers)) if experts else 0
        extra = dict(dense_layers=dense, dense_intermediate=int(get("intermediate_size"))) if dense else {}
        return cls(**extra,hidden=int(get("hidden_size")), intermediate=int(width),
                   layers=int(get("num_hidden_layers")), heads=heads,
                   kv_heads=int(get("num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), vocab=int(get("vocab_size")), experts=experts,
                   experts_per_token=int(get("num_experts_per_tok", None) or 0) if experts else 0)

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: projections, MLP, lm_head. A
        mixture of experts counts the active ones: k experts' MLPs plus the router."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate  # SwiGLU: gate, up, down
        if self.experts:
            mlp = self.experts_per_token * mlp + self.hidden * self.experts
        dense = self.dense_layers * (3 * self.hidden * self.dense_intermediate - mlp)  # their MLP instead
        return self.layers * (attention + mlp) + dense + self.hidden * self.vocab


def forward_flops(dims: ModelDims, seq_len: int) -> float:
    """FLOPs of one forward pass over one sequence of `seq_len` tokens."""
    dense = 2.0 * dims.matmul_params() * seq_len
    attention = 4.0 * dims.layers * dims.heads * dims.head_dim * seq_len * seq_len
    return dense + attention


def forward_passes(loss: Any, reference_source: str, packed: bool = False) -> tuple[int, int]:
    """(forwards with a backward, forwards without) per example of one step, or per packed
    row when `packed`.

    Args:
      loss: a `kto_jax.losses.registry.HaloLoss` (reads `paired`, `uses_kl`,
        `uses_reference`): paired losses run two sequences per example; KL losses
        add the mismatched pair (x_i, y_{i+1}) for the policy and the reference.
      reference_source: config.reference.source; only "model" runs reference forwards.
      packed: packed rows hold both completions of each example, so the policy runs
        once over them (with a backward) and the reference once (data.packing).
    """
    if packed:
        return 1, int(loss.uses_reference and reference_source == "model")
    sequences = 2 if loss.paired else 1
    reference = int(loss.uses_reference and reference_source == "model")
    kl = int(loss.uses_kl)
    return sequences, kl * (1 + reference) + sequences * reference


def step_flops(dims: ModelDims, *, loss: Any, reference_source: str,
               global_batch: int, seq_len: int, packed: bool = False, kl_len: int = 0) -> float:
    """Model FLOPs of one optimizer step over `global_batch` examples of `seq_len` tokens.

    `seq_len` is the padded prompt + completion length, the shape the step runs on;
    `packed`: `global_batch` rows of `seq_len` = data.pack_length tokens instead
    (attention counted over the whole row, as the masked dense kernel computes it);
    `kl_len` > 0: each row has a kl row of that many tokens beside it (the KL completions,
    kto_jax/data/packing.py `pack_streams`), run forward only by the policy and the
    reference, its queries attending the main row's keys and its own.
    """
    grad_passes, fwd_passes = forward_passes(loss, reference_source, packed)
    per_example = forward_flops(dims, seq_len) * (3 * grad_passes + fwd_passes)
    if packed and kl_len:
        kl = (2.0 * dims.matmul_params() * kl_len
              + 4.0 * dims.layers * dims.heads * dims.head_dim * kl_len * (seq_len + kl_len))
        per_example += kl * (1 + int(loss.uses_reference and reference_source == "model"))
    return per_example * global_batch


def peak_flops_per_device(device_kind: str, platform: str) -> float | None:
    """The bf16 peak of one device, or None when unknown (CPUs: no meaningful peak)."""
    if platform == "cpu":
        return None
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def mfu(flops: float, seconds: float, num_devices: int, peak_per_device: float | None) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' summed peak; 0 if unknown."""
    if not peak_per_device or seconds <= 0 or num_devices <= 0:
        return 0.0
    return flops / seconds / (num_devices * peak_per_device)
