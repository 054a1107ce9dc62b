"""Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention
(q/k RMSNorm) with a mixture-of-experts MLP in every layer (kto_jax/models/moe.py):
a router over `num_experts` SwiGLU experts of width `moe_intermediate_size`, each token
sent to `num_experts_per_tok` of them, the chosen probabilities renormalised when
`norm_topk_prob` (true in the released checkpoints).

config.json can make some layers dense (`mlp_only_layers`, or `decoder_sparse_step` > 1:
only every step-th layer sparse); no released checkpoint does, and one layer scan holds
one parameter layout, so such a config is refused by name.
"""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.errors import UserError
from kto_jax.models.families.qwen2 import refuse_sliding_window
from kto_jax.models.family import ATTENTION_ROWS, QK_NORM_ROWS, Family, moe_rows
from kto_jax.models.moe import MOE_MLP

ARCHITECTURE = "Qwen3MoeForCausalLM"
MOE_OPTIONS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "router_aux_loss_coef")
# transformers' Qwen3MoeConfig defaults: what a config.json without the key means.
# (num_experts 128 is read below: transformers 5 writes it as num_local_experts.)
HF_DEFAULTS = {"decoder_sparse_step": 1, "mlp_only_layers": [], "num_experts_per_tok": 8,
               "moe_intermediate_size": 768, "norm_topk_prob": False,
               "router_aux_loss_coef": 0.001}


def refuse_dense_layers(architecture: str, hf: Mapping[str, Any]) -> None:
    """UserError when config.json makes any layer dense (every layer must be sparse)."""
    step, dense_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    dense = [i for i in range(hf["num_hidden_layers"]) if i in dense_only or (i + 1) % step]
    if dense:
        raise UserError(
            f"{architecture} with dense layers among the sparse ones (layers {dense[:8]}: mlp_only_layers="
            f"{sorted(dense_only)}, decoder_sparse_step={step}) is not supported: kto-jax's one layer scan "
            "holds one MLP layout, so every layer must be a mixture of experts "
            "(mlp_only_layers=[] and decoder_sparse_step=1, as in the released checkpoints)")


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    refuse_sliding_window(ARCHITECTURE, hf)
    refuse_dense_layers(ARCHITECTURE, hf)
    return {"num_experts": hf.get("num_local_experts") or hf.get("num_experts") or 128,
            "num_experts_per_tok": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "norm_topk_prob": bool(hf["norm_topk_prob"]),
            "router_aux_loss_coef": float(hf["router_aux_loss_coef"])}


def write_hf(config: Any) -> dict[str, Any]:
    return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size, "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": config.router_aux_loss_coef}


FAMILY = Family(architecture=ARCHITECTURE, model_type="qwen3_moe",
                rows=ATTENTION_ROWS + QK_NORM_ROWS + moe_rows("mlp", "gate_proj", "up_proj", "down_proj"),
                read_hf=read_hf, write_hf=write_hf, fixed={"qk_norm": True},
                options=MOE_OPTIONS + ("norm_topk_prob",), mlp=MOE_MLP, hf_defaults=HF_DEFAULTS)
