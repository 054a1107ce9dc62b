"""The HF <-> kto-jax parameter table: pure data plus four layout transforms.

Each row names our parameter (its path in the NNX state), the Hugging Face tensor
name ('{i}' = layer index for the stacked layer parameters) and the layout
transform between them. Rows are grouped by architecture feature (q/k/v bias,
q/k norm, untied head), and `param_table(config)` picks the groups a config
uses. Import applies `to_ours`, export applies `to_hf`: one is the inverse of the
other by construction, so export is import run backwards.

HF layouts: torch Linear weights are [out, in]; q/k/v rows are (head, head_dim);
o_proj columns are (head, head_dim). Ours: [in, out], heads split out as axes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kto_jax.models.config import ModelConfig

# transform name: (HF tensor -> ours given our per-layer shape, ours -> HF)
IDENTITY = "identity"   # norms, embedding: same layout
LINEAR = "linear"       # HF [out, in] -> ours [in, out]
HEADS_IN = "heads_in"   # HF [N*hd, D] -> ours [D, N, hd]   (q/k/v projections)
HEADS_OUT = "heads_out"  # HF [D, H*hd] -> ours [H, hd, D]  (o_proj)
HEADS_BIAS = "heads_bias"  # HF [N*hd] -> ours [N, hd]      (q/k/v bias)


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter: our state path, its HF name and the transform between the layouts."""

    path: tuple[str, ...]
    hf_name: str
    transform: str

    @property
    def stacked(self) -> bool:
        """True for decoder-layer parameters: HF has one tensor per layer, we stack them."""
        return "{i}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _layer(name: str, hf_suffix: str, transform: str) -> ParamRow:
    return ParamRow(("layers", name), f"model.layers.{{i}}.{hf_suffix}", transform)


BASE_ROWS = (
    ParamRow(("embed_tokens",), "model.embed_tokens.weight", IDENTITY),
    ParamRow(("norm",), "model.norm.weight", IDENTITY),
    _layer("input_layernorm", "input_layernorm.weight", IDENTITY),
    _layer("q_proj", "self_attn.q_proj.weight", HEADS_IN),
    _layer("k_proj", "self_attn.k_proj.weight", HEADS_IN),
    _layer("v_proj", "self_attn.v_proj.weight", HEADS_IN),
    _layer("o_proj", "self_attn.o_proj.weight", HEADS_OUT),
    _layer("post_attention_layernorm", "post_attention_layernorm.weight", IDENTITY),
    _layer("gate_proj", "mlp.gate_proj.weight", LINEAR),
    _layer("up_proj", "mlp.up_proj.weight", LINEAR),
    _layer("down_proj", "mlp.down_proj.weight", LINEAR),
)
QKV_BIAS_ROWS = (  # Qwen2 (config.attention_bias)
    _layer("q_bias", "self_attn.q_proj.bias", HEADS_BIAS),
    _layer("k_bias", "self_attn.k_proj.bias", HEADS_BIAS),
    _layer("v_bias", "self_attn.v_proj.bias", HEADS_BIAS),
)
QK_NORM_ROWS = (  # Qwen3 (config.qk_norm)
    _layer("q_norm", "self_attn.q_norm.weight", IDENTITY),
    _layer("k_norm", "self_attn.k_norm.weight", IDENTITY),
)
UNTIED_HEAD_ROWS = (ParamRow(("lm_head",), "lm_head.weight", LINEAR),)  # not config.tie_word_embeddings

# HF tensors that carry no parameters (old Llama checkpoints store RoPE tables); skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def param_table(config: ModelConfig) -> tuple[ParamRow, ...]:
    """The rows a config's parameters need, in checkpoint order."""
    rows = BASE_ROWS
    if config.attention_bias:
        rows += QKV_BIAS_ROWS
    if config.qk_norm:
        rows += QK_NORM_ROWS
    if not config.tie_word_embeddings:
        rows += UNTIED_HEAD_ROWS
    return rows


def ignorable_hf_name(name: str, config: ModelConfig) -> bool:
    """HF tensors we may meet and skip: RoPE caches, and lm_head.weight of a tied model."""
    return name.endswith(IGNORED_HF_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")


def hf_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for one (per-layer) parameter of our `shape`."""
    if transform == IDENTITY:
        return shape
    if transform == LINEAR:
        return shape[::-1]
    if transform == HEADS_IN:
        d, n, hd = shape
        return (n * hd, d)
    if transform == HEADS_OUT:
        h, hd, d = shape
        return (d, h * hd)
    if transform == HEADS_BIAS:
        return (int(np.prod(shape)),)
    raise ValueError(f"unknown transform {transform!r}")


def to_ours(transform: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> our layout of `shape` (per layer)."""
    if transform == IDENTITY:
        return tensor
    if transform == LINEAR:
        return tensor.T
    if transform in (HEADS_IN, HEADS_OUT):
        return tensor.T.reshape(shape)
    if transform == HEADS_BIAS:
        return tensor.reshape(shape)
    raise ValueError(f"unknown transform {transform!r}")


def to_hf(transform: str, array: np.ndarray) -> np.ndarray:
    """Our (per-layer) array -> the HF tensor; the inverse of `to_ours`."""
    if transform == IDENTITY:
        return array
    if transform == LINEAR:
        return array.T
    if transform == HEADS_IN:
        return array.reshape(array.shape[0], -1).T
    if transform == HEADS_OUT:
        return array.reshape(-1, array.shape[-1]).T
    if transform == HEADS_BIAS:
        return array.reshape(-1)
    raise ValueError(f"unknown transform {transform!r}")
