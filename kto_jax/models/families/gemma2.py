"""Gemma 2 (`Gemma2ForCausalLM`): 2B, 9B, 27B.

Its layer, against Llama's: RMSNorm scaled by (1 + w) in float32 (random init 0), a norm
after attention and another around the MLP ("sandwich": input_layernorm, then attention,
post_attention_layernorm; pre_feedforward_layernorm, then the MLP,
post_feedforward_layernorm), GeGLU (`hidden_activation` gelu_pytorch_tanh), the
embedding scaled by sqrt(hidden_size) in the compute dtype, attention scaled by
`query_pre_attn_scalar` ** -0.5 instead of head_dim ** -0.5, attention logits and final
logits soft-capped (c * tanh(x / c)), sliding-window (4096) and global layers
alternating from the first (`layer_types`; older config.json files have none and mean
that pattern), tied embeddings. Gemma 3 (gemma3.py) reuses this reading.
"""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.errors import UserError
from kto_jax.models.family import BASE_ROWS, SANDWICH_NORM_ROWS, Family, NormPlacement
from kto_jax.models.layers import rms_norm_plus_one

SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA_NORMS = NormPlacement(before_attention="input_layernorm", before_mlp="pre_feedforward_layernorm",
                            after_attention="post_attention_layernorm",
                            after_mlp="post_feedforward_layernorm")
GEMMA_OPTIONS = ("sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcap",
                 "final_logit_softcap")
# transformers' Gemma2Config defaults: what a config.json without the key means.
HF_DEFAULTS = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
               "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
               "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
               "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
               "tie_word_embeddings": True, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}


def layer_types_of(hf: Mapping[str, Any], pattern: int) -> list[str]:
    """config.json's `layer_types`, or HF's default: every `pattern`-th layer global, the rest sliding."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    return [SLIDING if (i + 1) % pattern else FULL for i in range(hf["num_hidden_layers"])]


def read_gemma(architecture: str, hf: Mapping[str, Any], pattern: int) -> dict[str, Any]:
    """The config.json keys Gemma 2 and 3 share, as ModelConfig fields."""
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"{architecture} with use_bidirectional_attention=true (an embedding model) is not "
                        "supported: kto-jax trains causal language models")
    return {"hidden_act": hf.get("hidden_activation") or hf.get("hidden_act"),
            "sliding_window": hf.get("sliding_window"),
            "layer_types": layer_types_of(hf, pattern),
            "query_pre_attn_scalar": hf.get("query_pre_attn_scalar"),
            "attn_logit_softcap": hf.get("attn_logit_softcapping"),
            "final_logit_softcap": hf.get("final_logit_softcapping")}


def write_gemma(config: Any) -> dict[str, Any]:
    """ModelConfig -> the config.json keys of `read_gemma`."""
    return {"hidden_activation": config.hidden_act, "sliding_window": config.sliding_window,
            "layer_types": list(config.attention_types),
            "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
            "attn_logit_softcapping": config.attn_logit_softcap,
            "final_logit_softcapping": config.final_logit_softcap, "attention_bias": False}


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return read_gemma("Gemma2ForCausalLM", hf, pattern=2)


FAMILY = Family(architecture="Gemma2ForCausalLM", model_type="gemma2", rows=BASE_ROWS + SANDWICH_NORM_ROWS,
                read_hf=read_hf, write_hf=write_gemma, options=GEMMA_OPTIONS, norm=rms_norm_plus_one,
                norms=GEMMA_NORMS, embed_scale=True, norm_init=0.0, hf_defaults=HF_DEFAULTS)
