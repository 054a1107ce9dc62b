"""Mistral 7B v0.1 to v0.3 (`MistralForCausalLM`): Llama's layer, every layer with the
same sliding window (`sliding_window`: a query sees the last W positions; null: none)."""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.models.family import BASE_ROWS, Family


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {"sliding_window": hf.get("sliding_window")}


def write_hf(config: Any) -> dict[str, Any]:
    return {"sliding_window": config.sliding_window}


FAMILY = Family(architecture="MistralForCausalLM", model_type="mistral", rows=BASE_ROWS,
                read_hf=read_hf, write_hf=write_hf, options=("sliding_window",))
