"""Tiny random transformers models (float32, CPU) of every supported architecture: one case
per architecture, built by tests/tiny_models.py's `hf_model`, and the models tests' batch."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from kto_jax.config import config_file
from tiny_models import hf_model

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, extra config fields)
HF_CASES = {
    "llama2": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    # Llama 3.1/3.2: llama3 rope scaling (original 256 so every branch of the formula is hit
    # at head_dim 16) and tied embeddings as in Llama 3.2 1B/3B.
    "llama32_tied": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256})),
    # The gated MLP's activation switch: GeGLU (tanh-approximated GELU) instead of SwiGLU.
    "llama_geglu": (transformers.LlamaConfig, dict(hidden_act="gelu_pytorch_tanh")),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4, head_dim=16)),
    # Ministral: sliding and global layers interleaved (layer_types), windows shorter than the batch.
    "ministral": (transformers.MinistralConfig, dict(
        sliding_window=4, head_dim=16, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, rope_theta=1000000.0,
                                             tie_word_embeddings=True)),
    # Gemma 2: (1 + w) norms around attention and MLP, scaled embedding, query_pre_attn_scalar
    # != head_dim, attention and final logits soft-capped at caps the random logits reach,
    # sliding (window 4 < the batch's 12) and global layers alternating.
    "gemma2": (transformers.Gemma2Config, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=4, num_hidden_layers=3,
        attn_logit_softcapping=1.5, final_logit_softcapping=2.0)),
    # Gemma 3 text: q/k norms, local RoPE base for the sliding layers and a linearly scaled
    # global one, two sliding layers then a global one.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=4, num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})),
    # Mixtures of experts: 8 experts of width 32, top 2, in every layer; Qwen3-MoE's chosen
    # probabilities as the softmax gives them (norm_topk_prob false), Mixtral's renormalised.
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=False, tie_word_embeddings=False)),
    # Qwen3-MoE with dense layers among the sparse ones: layer 0 dense (mlp_only_layers), and
    # every other layer dense (decoder_sparse_step 2 of 4 layers: 0 and 2 dense, 1 and 3 sparse).
    "qwen3_moe_dense0": (transformers.Qwen3MoeConfig, dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, tie_word_embeddings=False, mlp_only_layers=[0])),
    "qwen3_moe_step2": (transformers.Qwen3MoeConfig, dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_hidden_layers=4,
        norm_topk_prob=False, tie_word_embeddings=False, decoder_sparse_step=2)),
    "mixtral": (transformers.MixtralConfig, dict(
        head_dim=16, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)),
    # Gemma 3 multimodal (4B-27B): the same language model under text_config, plus a tiny
    # SigLIP vision tower and projector that kto-jax carries through untouched.
    "gemma3_multimodal": (transformers.Gemma3Config, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=4, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})),
}
# Multimodal configs: the case's fields are the text_config's; these are the rest.
_MULTIMODAL = {transformers.Gemma3Config: dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=28, patch_size=14),
    mm_tokens_per_image=4)}


def hf_config(name: str) -> transformers.PretrainedConfig:
    """The transformers config of one case."""
    config_cls, extra = HF_CASES[name]
    if config_cls in _MULTIMODAL:
        return config_cls(text_config={**_COMMON, **extra}, **_MULTIMODAL[config_cls])
    return config_cls(**{**_COMMON, **extra})


def make_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised float32 model of case `name`; norms and biases are randomised too."""
    return hf_model(hf_config(name), seed=seed)


def padded_batch() -> tuple[np.ndarray, np.ndarray]:
    """ids, mask int32 [3, 12]: left-padded rows of lengths 12, 8, 5; row 2 is also right-padded."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, size=(3, 12)).astype(np.int32)
    mask = np.zeros((3, 12), np.int32)
    mask[0, :] = 1
    mask[1, 4:] = 1
    mask[2, 5:10] = 1
    ids[mask == 0] = 0
    return ids, mask


def hf_logits(model: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray,
              positions: np.ndarray) -> np.ndarray:
    """transformers' float32 logits with explicit position_ids and attention_mask."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.tensor(np.asarray(positions), dtype=torch.long))
    return out.logits.float().numpy()


def base_config():
    """configs/base.py's get_config()."""
    return config_file("base")
