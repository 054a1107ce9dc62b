"""Mixtral (`MixtralForCausalLM`: 8x7B, 8x22B): Mistral's attention with a mixture-of-experts
MLP in every layer (kto_jax/models/moe.py): `num_local_experts` SwiGLU experts of width
`intermediate_size` (HF names w1 gate, w3 up, w2 down, under `block_sparse_moe`), each
token sent to `num_experts_per_tok` of them, weighted by the softmax over the chosen
experts' router logits (the top-k probabilities renormalised: `norm_topk_prob` always).
`router_jitter_noise` (a training-time input jitter of transformers, 0 in the released
checkpoints) is not applied.
"""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.models.families.qwen3_moe import MOE_OPTIONS
from kto_jax.models.family import ATTENTION_ROWS, Family, moe_rows
from kto_jax.models.moe import MOE_MLP

HF_DEFAULTS = {"num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001}


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {"sliding_window": hf.get("sliding_window"), "num_experts": hf["num_local_experts"],
            "num_experts_per_tok": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["intermediate_size"],
            "router_aux_loss_coef": float(hf["router_aux_loss_coef"])}


def write_hf(config: Any) -> dict[str, Any]:
    return {"sliding_window": config.sliding_window, "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "intermediate_size": config.moe_intermediate_size,
            "router_aux_loss_coef": config.router_aux_loss_coef}


FAMILY = Family(architecture="MixtralForCausalLM", model_type="mixtral",
                rows=ATTENTION_ROWS + moe_rows("block_sparse_moe", "w1", "w3", "w2"),
                read_hf=read_hf, write_hf=write_hf, fixed={"norm_topk_prob": True},
                options=MOE_OPTIONS + ("sliding_window",), mlp=MOE_MLP, hf_defaults=HF_DEFAULTS)
