"""`from_pretrained`: the one entry point that loads a checkpoint, with a float base
(kto_jax/models/hf_io.py) or a quantised one (QLoRA: kto_jax/models/quantized_base.py,
each projection quantised as it is read)."""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from kto_jax.models import hf_io
from kto_jax.models.config import ModelConfig
from kto_jax.models.quantize import Quantization
from kto_jax.models.quantized_base import load_quantized_model
from kto_jax.models.transformer import Transformer


def from_pretrained(path: str, *, mesh: Mesh | None = None, rules: Any = None,
                    param_dtype: Any = "float32", dtype: Any = "float32",
                    quantization: Quantization | None = None, **overrides: Any
                    ) -> tuple[Transformer, ModelConfig]:
    """`hf_io.from_pretrained(path, ...)` (a directory, hub id or .gguf file onto `mesh`), or
    with `quantization` other than "none" the same checkpoint with its layer projections
    stored int8 / NF4 (`ModelConfig.quantization` set; the host never holds the float model)."""
    if quantization is None or not quantization.enabled:
        return hf_io.from_pretrained(path, mesh=mesh, rules=rules, param_dtype=param_dtype, dtype=dtype,
                                     **overrides)
    hf_config, source, named = hf_io.open_checkpoint(path)
    return load_quantized_model(hf_config, source, quantization, mesh=mesh, rules=rules, untrained_from=named,
                                param_dtype=param_dtype, dtype=dtype, **overrides)
