"""The model families, one module each, registered in one table.

`FAMILIES` maps an HF `architectures[0]` to its `kto_jax.models.family.Family` record.
Adding a family: its module here, one entry below, a preset in kto_jax/models/config.py,
a row in tests/models/hf_tiny_models.py and in docs/models.md (docs/models.md says how).
"""

from __future__ import annotations

from kto_jax.errors import UserError
from kto_jax.models.families import (
    gemma2, gemma3, gemma3_multimodal, llama, ministral, mistral, qwen2, qwen3)
from kto_jax.models.family import Family

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    llama.FAMILY, mistral.FAMILY, ministral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma2.FAMILY,
    gemma3.FAMILY, gemma3_multimodal.FAMILY)}


def family_of(architecture: str) -> Family:
    """The family of an HF architecture name; UserError naming the supported ones."""
    if architecture not in FAMILIES:
        raise UserError(f"unsupported model architecture {architecture!r}; supported: "
                        f"{', '.join(FAMILIES)} (docs/models.md says how to add one)")
    return FAMILIES[architecture]


def architecture_of_model_type(model_type: str | None) -> str | None:
    """The architecture of an HF `model_type` (config.json without `architectures`), or None."""
    return next((f.architecture for f in FAMILIES.values() if f.model_type == model_type), None)
