"""Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention
(q/k RMSNorm) with a mixture-of-experts MLP in every layer (kto_jax/models/moe.py):
a router over `num_experts` SwiGLU experts of width `moe_intermediate_size`, each token
sent to `num_experts_per_tok` of them, the chosen probabilities renormalised when
`norm_topk_prob` (true in the released checkpoints).

config.json can make some layers dense (`mlp_only_layers`, or `decoder_sparse_step` > 1:
only every step-th layer sparse), as transformers' Qwen3MoeDecoderLayer does: layer i has
a dense gated MLP of width `intermediate_size` when i is in mlp_only_layers or
(i + 1) % decoder_sparse_step != 0. No released checkpoint does; such a config loads
with `ModelConfig.dense_mlp_layers` listing those layers: their MLP weights are one stack,
the sparse layers' router and experts another (kto_jax/models/transformer.py).
"""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.errors import UserError
from kto_jax.models.families.qwen2 import refuse_sliding_window
from kto_jax.models.family import ATTENTION_ROWS, BASE_ROWS, QK_NORM_ROWS, Family, moe_rows
from kto_jax.models.moe import MOE_MLP

ARCHITECTURE = "Qwen3MoeForCausalLM"
MOE_OPTIONS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_aux_loss_coef")
# transformers' Qwen3MoeConfig defaults: what a config.json without the key means.
# (num_experts 128 is read below: transformers 5 writes it as num_local_experts.)
HF_DEFAULTS = {"decoder_sparse_step": 1, "mlp_only_layers": [], "num_experts_per_tok": 8,
               "moe_intermediate_size": 768, "norm_topk_prob": False,
               "router_aux_loss_coef": 0.001}


def dense_layers(architecture: str, hf: Mapping[str, Any]) -> tuple[int, ...]:
    """The layers config.json gives a dense MLP (transformers' Qwen3MoeDecoderLayer rule);
    UserError when that is every layer (a dense model: Qwen3ForCausalLM's)."""
    step, dense_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    n = hf["num_hidden_layers"]
    dense = tuple(i for i in range(n) if i in dense_only or not (experts != 0 and (i + 1) % step == 0))
    if len(dense) == n:
        raise UserError(f"{architecture} with no sparse layer (num_experts={experts}, mlp_only_layers="
                        f"{sorted(dense_only)}, decoder_sparse_step={step}) is a dense model: convert it "
                        "to Qwen3ForCausalLM, or give it at least one mixture-of-experts layer")
    return dense


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    refuse_sliding_window(ARCHITECTURE, hf)
    return {"dense_mlp_layers": dense_layers(ARCHITECTURE, hf),
            "num_experts": hf.get("num_local_experts") or hf.get("num_experts") or 128,
            "num_experts_per_tok": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "norm_topk_prob": bool(hf["norm_topk_prob"]),
            "router_aux_loss_coef": float(hf["router_aux_loss_coef"])}


def write_hf(config: Any) -> dict[str, Any]:
    return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size, "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": list(config.dense_mlp_layers),
            "router_aux_loss_coef": config.router_aux_loss_coef}


FAMILY = Family(architecture=ARCHITECTURE, model_type="qwen3_moe",
                rows=ATTENTION_ROWS + QK_NORM_ROWS + moe_rows("mlp", "gate_proj", "up_proj", "down_proj"),
                read_hf=read_hf, write_hf=write_hf, fixed={"qk_norm": True},
                options=MOE_OPTIONS + ("norm_topk_prob", "dense_mlp_layers"), mlp=MOE_MLP,
                hf_defaults=HF_DEFAULTS,
                dense_mlp_rows=tuple(r for r in BASE_ROWS if r.path[-1] in ("gate_proj", "up_proj", "down_proj")))
