"""Models: one Flax NNX decoder-only transformer for Llama / Mistral / Qwen2 / Qwen3, and HF import/export."""

from kto_jax.models.config import PRESETS, ModelConfig, preset
from kto_jax.models.transformer import Transformer, abstract_model, positions_from_mask

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "abstract_model", "positions_from_mask"]
