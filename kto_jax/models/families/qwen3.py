"""Qwen3, dense (`Qwen3ForCausalLM`): Llama's layer with an RMSNorm over head_dim on q and
k before RoPE (always), and an explicit `head_dim`."""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.models.families.qwen2 import refuse_sliding_window
from kto_jax.models.family import BASE_ROWS, QK_NORM_ROWS, Family


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    refuse_sliding_window("Qwen3ForCausalLM", hf)
    return {}


def write_hf(config: Any) -> dict[str, Any]:
    del config
    return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None}


FAMILY = Family(architecture="Qwen3ForCausalLM", model_type="qwen3", rows=BASE_ROWS + QK_NORM_ROWS,
                read_hf=read_hf, write_hf=write_hf, fixed={"qk_norm": True})
