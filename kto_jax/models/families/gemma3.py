"""Gemma 3, text (`Gemma3ForCausalLM`: gemma-3-1b, and the language model of the 4B, 12B
and 27B multimodal checkpoints, gemma3_multimodal.py).

Gemma 2's layer (gemma2.py: (1 + w) norms around attention and the MLP, GeGLU, scaled
embedding, `query_pre_attn_scalar`) with an RMSNorm on q and k per head (always), five
sliding-window layers to one global (`layer_types`, or `sliding_window_pattern` in older
config.json files), and two RoPE tables: the global layers' base `rope_theta` with
`rope_scaling` (linear, factor 8 from 4B up), the sliding layers' own base
`rope_local_base_freq`, unscaled. No soft-capping in the released models (the keys
are read all the same).
"""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.errors import UserError
from kto_jax.models.families.gemma2 import (
    FULL, GEMMA_NORMS, GEMMA_OPTIONS, SLIDING, read_gemma, write_gemma)
from kto_jax.models.family import BASE_ROWS, QK_NORM_ROWS, SANDWICH_NORM_ROWS, Family
from kto_jax.models.layers import rms_norm_plus_one

# transformers' Gemma3TextConfig defaults: what a config.json without the key means (the 4B-27B
# checkpoints' text_config lists only a few keys and relies on these).
HF_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
               "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
               "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
               "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
               "final_logit_softcapping": None, "attn_logit_softcapping": None}


def read_rope(architecture: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    """The two RoPE tables: from transformers v5's `rope_parameters` per layer type, else
    the v4 keys (`rope_theta` + `rope_scaling` global, read by ModelConfig; `rope_local_base_freq`)."""
    params = hf.get("rope_parameters") or {}
    if FULL not in params and SLIDING not in params:
        return {"rope_local_theta": float(hf["rope_local_base_freq"])}
    full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    if local.get("rope_type", "default") != "default":
        raise UserError(f"{architecture} with rope_parameters.{SLIDING}.rope_type "
                        f"{local['rope_type']!r} is not supported (the sliding layers' RoPE is unscaled)")
    theta = float(full.pop("rope_theta", hf["rope_theta"]))
    scaled = full.get("rope_type", "default") != "default"
    return {"rope_theta": theta, "rope_scaling": full if scaled else None,
            "rope_local_theta": float(local.get("rope_theta", hf["rope_local_base_freq"]))}


def read_text(architecture: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3 text keys as ModelConfig fields (shared with the multimodal family)."""
    return {**read_gemma(architecture, hf, pattern=hf.get("sliding_window_pattern") or 6),
            **read_rope(architecture, hf)}


def write_hf(config: Any) -> dict[str, Any]:
    return {**write_gemma(config), "rope_local_base_freq": config.rope_local_theta}


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return read_text("Gemma3ForCausalLM", hf)


ROWS = BASE_ROWS + SANDWICH_NORM_ROWS + QK_NORM_ROWS
OPTIONS = GEMMA_OPTIONS + ("rope_local_theta",)
FAMILY = Family(architecture="Gemma3ForCausalLM", model_type="gemma3_text", rows=ROWS,
                read_hf=read_hf, write_hf=write_hf, fixed={"qk_norm": True}, options=OPTIONS,
                norm=rms_norm_plus_one, norms=GEMMA_NORMS, embed_scale=True, norm_init=0.0,
                hf_defaults=HF_DEFAULTS)
