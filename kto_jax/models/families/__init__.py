"""The model families, one module each, registered in one table.

`FAMILIES` maps an HF `architectures[0]` to its `kto_jax.models.family.Family` record.
Adding a family: its module here, one entry below, a preset in kto_jax/models/config.py,
a row in tests/models/hf_tiny_models.py and in docs/models.md (docs/models.md says how).
"""

from __future__ import annotations

from kto_jax.errors import UserError
from kto_jax.models.families import (
    gemma2, gemma3, gemma3_multimodal, llama, ministral, mistral, mixtral, qwen2, qwen3, qwen3_moe)
from kto_jax.models.family import Family

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    llama.FAMILY, mistral.FAMILY, ministral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma2.FAMILY,
    gemma3.FAMILY, gemma3_multimodal.FAMILY, qwen3_moe.FAMILY, mixtral.FAMILY)}


# Known architectures kto-jax refuses, with what its one layer design lacks for them.
_GEMMA4 = (
    "Gemma 4 is not supported: its text layers are not Gemma 3's. Its global layers have other "
    "parameter shapes than its sliding ones (head_dim 512 against 256, their own KV-head count, "
    "keys that double as values with no v_proj), which one stacked layer scan cannot hold; its "
    "norms scale by w (not 1 + w), values get a norm of their own, attention is unscaled, the "
    "global layers' RoPE is 'proportional' (rotating a quarter of head_dim) and each layer has a "
    "learned output scalar. E2B/E4B add per-layer input embeddings and layers that reuse earlier "
    "layers' keys and values, 26B-A4B a mixture-of-experts block beside the MLP. "
    "Gemma 3 (Gemma3ForCausalLM, Gemma3ForConditionalGeneration) is supported")
_GPT_OSS = (
    "gpt-oss is not supported: its layers need what the mixture-of-experts layer of Qwen3-MoE and "
    "Mixtral lacks. Attention has a learned sink logit per head in every softmax and biases on "
    "q/k/v/o (our o_proj has no bias); the router and the experts have biases; its experts' SwiGLU is "
    "clamped (limit 7) and gated as (up + 1) * gate * sigmoid(1.702 gate) with gate and up interleaved in "
    "one tensor; the released checkpoints store the experts in MXFP4 (blocks and scales, not float "
    "tensors); RoPE is YaRN-scaled; sliding (128) and global layers alternate. "
    "Qwen3MoeForCausalLM and MixtralForCausalLM are supported")
REFUSED = {"Gemma4ForCausalLM": _GEMMA4, "Gemma4ForConditionalGeneration": _GEMMA4,
           "GptOssForCausalLM": _GPT_OSS}
_REFUSED_MODEL_TYPES = {"gemma4": "Gemma4ForConditionalGeneration", "gemma4_text": "Gemma4ForCausalLM",
                        "gpt_oss": "GptOssForCausalLM"}


def family_of(architecture: str) -> Family:
    """The family of an HF architecture name; UserError naming the supported ones (or, for an
    architecture known and refused, what is missing)."""
    if architecture in REFUSED:
        raise UserError(f"{architecture}: {REFUSED[architecture]} (docs/models.md)")
    if architecture not in FAMILIES:
        raise UserError(f"unsupported model architecture {architecture!r}; supported: "
                        f"{', '.join(FAMILIES)} (docs/models.md says how to add one)")
    return FAMILIES[architecture]


def architecture_of_model_type(model_type: str | None) -> str | None:
    """The architecture of an HF `model_type` (config.json without `architectures`), or None."""
    return next((f.architecture for f in FAMILIES.values() if f.model_type == model_type),
                _REFUSED_MODEL_TYPES.get(model_type))
