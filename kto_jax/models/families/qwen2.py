"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): Llama's layer with a bias on q, k and v (always)."""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.errors import UserError
from kto_jax.models.family import BASE_ROWS, QKV_BIAS_ROWS, Family


def refuse_sliding_window(architecture: str, hf: Mapping[str, Any]) -> None:
    """Qwen's `use_sliding_window` (sliding layers from `max_window_layers` on) is not read."""
    if hf.get("use_sliding_window"):
        raise UserError(f"{architecture} with use_sliding_window=true is not supported "
                        "(per-layer sliding windows); set it to false")


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    refuse_sliding_window("Qwen2ForCausalLM", hf)
    return {}


def write_hf(config: Any) -> dict[str, Any]:
    del config
    return {"use_sliding_window": False, "sliding_window": None}


FAMILY = Family(architecture="Qwen2ForCausalLM", model_type="qwen2", rows=BASE_ROWS + QKV_BIAS_ROWS,
                read_hf=read_hf, write_hf=write_hf, fixed={"attention_bias": True})
