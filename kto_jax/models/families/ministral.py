"""Ministral 8B (`MinistralForCausalLM`): Mistral's layer with sliding-window and global
layers interleaved, as config.json's `layer_types` lists them ("full_attention" or
"sliding_attention" per layer; absent: every layer sliding when `sliding_window` is set)."""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.models.family import BASE_ROWS, Family


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {"sliding_window": hf.get("sliding_window"), "layer_types": hf.get("layer_types")}


def write_hf(config: Any) -> dict[str, Any]:
    return {"sliding_window": config.sliding_window, "layer_types": list(config.attention_types)}


FAMILY = Family(architecture="MinistralForCausalLM", model_type="ministral", rows=BASE_ROWS,
                read_hf=read_hf, write_hf=write_hf, options=("sliding_window", "layer_types"))
