"""Models: one Flax NNX decoder-only transformer for every family of kto_jax/models/families/
(Llama, Mistral, Ministral, Qwen2, Qwen3, Gemma 2, Gemma 3), and HF import/export."""

from kto_jax.models.config import PRESETS, ModelConfig, preset
from kto_jax.models.transformer import Transformer, abstract_model, positions_from_mask
from kto_jax.models.tensor_source import SafetensorsSource, TensorSource
from kto_jax.models.hf_io import load_tokenizer, save_pretrained
from kto_jax.models.pretrained import from_pretrained
from kto_jax.models.init import init_model

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "abstract_model", "positions_from_mask",
           "TensorSource", "SafetensorsSource", "from_pretrained", "save_pretrained", "load_tokenizer",
           "init_model"]
