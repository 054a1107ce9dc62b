"""Llama 2, 3, 3.1, 3.2 and SmolLM2 (`LlamaForCausalLM`): the layer the other families vary.

Pre-norm layers: RMSNorm, grouped-query attention with half-split RoPE (default,
linear or llama3 scaling), RMSNorm, a gated MLP (SwiGLU); tied or untied lm_head.
"""

from __future__ import annotations

from typing import Any

from kto_jax.models.family import BASE_ROWS, Family


def write_hf(config: Any) -> dict[str, Any]:
    del config
    return {"attention_bias": False, "mlp_bias": False}


FAMILY = Family(architecture="LlamaForCausalLM", model_type="llama", rows=BASE_ROWS, write_hf=write_hf)
