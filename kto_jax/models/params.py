"""The HF <-> kto-jax parameter table: rows from the family, and four layout transforms.

Each row names our parameter (its path in the NNX state), the Hugging Face tensor
name ('{i}' = layer index for the stacked layer parameters) and the layout
transform between them (`kto_jax.models.family.ParamRow`). A family lists its rows
(`Family.rows`, mostly shared row groups: the base layer, q/k/v bias, q/k norm), and
`param_table(config)` adds the untied lm_head when there is one. Import applies
`to_ours`, export applies `to_hf`: one is the inverse of the other by construction,
so export is import run backwards.

HF layouts: torch Linear weights are [out, in]; q/k/v rows are (head, head_dim);
o_proj columns are (head, head_dim). Ours: [in, out], heads split out as axes. An
expert weight is one HF tensor per layer and expert, ours one [L, E, in, out] array;
the transforms see one expert's slice.
"""

from __future__ import annotations

import numpy as np

from kto_jax.models.config import ModelConfig
from kto_jax.models.family import (  # noqa: F401  (the table's vocabulary, re-exported)
    BASE_ROWS, EXPERT_LINEAR, HEADS_BIAS, HEADS_IN, HEADS_OUT, IDENTITY, LINEAR, QK_NORM_ROWS, QKV_BIAS_ROWS,
    UNTIED_HEAD_ROWS, ParamRow)

# HF tensors that carry no parameters (old Llama checkpoints store RoPE tables); skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def param_table(config: ModelConfig) -> tuple[ParamRow, ...]:
    """The rows a config's parameters need, in checkpoint order."""
    rows = config.family.rows
    if config.dense_mlp_layers:
        rows += config.family.dense_mlp_rows
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
    if transform in (LINEAR, EXPERT_LINEAR):  # an expert weight: per expert slice
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
    if transform in (LINEAR, EXPERT_LINEAR):  # an expert weight: per expert slice
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
    if transform in (LINEAR, EXPERT_LINEAR):  # an expert weight: per expert slice
        return array.T
    if transform == HEADS_IN:
        return array.reshape(array.shape[0], -1).T
    if transform == HEADS_OUT:
        return array.reshape(-1, array.shape[-1]).T
    if transform == HEADS_BIAS:
        return array.reshape(-1)
    raise ValueError(f"unknown transform {transform!r}")
