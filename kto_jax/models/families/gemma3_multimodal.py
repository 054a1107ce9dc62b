"""Gemma 3 multimodal (`Gemma3ForConditionalGeneration`: gemma-3-4b, 12b, 27b): its language
model is trained, the rest rides along.

The language model is Gemma 3 text (gemma3.py), its config.json keys under `text_config`
(which lists only what differs from transformers' Gemma3TextConfig defaults), its
tensors under `language_model.model.` (the hub checkpoints' spelling, which transformers
5 still writes) or `model.language_model.` (transformers 5's module names): the rows use
the latter, a checkpoint in the former is read through the renaming and exported in it.
The SigLIP vision tower and the multimodal projector are not trained: an export copies
their tensors bit for bit from the checkpoint the run started from
(`ModelConfig.untrained_from`), and writes config.json back with its vision_config and
image-token keys, so the result loads wherever the original does.
"""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.models.families import gemma3
from kto_jax.models.family import Family, moved

ARCHITECTURE = "Gemma3ForConditionalGeneration"


def read_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    return gemma3.read_text(ARCHITECTURE, hf)


FAMILY = Family(
    architecture=ARCHITECTURE, model_type="gemma3",
    rows=moved(gemma3.ROWS, "model.", "model.language_model."),
    read_hf=read_hf, write_hf=gemma3.write_hf, fixed={"qk_norm": True},
    options=gemma3.OPTIONS + ("outer_config",), norm=gemma3.FAMILY.norm, norms=gemma3.FAMILY.norms,
    embed_scale=True, norm_init=0.0, hf_defaults=gemma3.HF_DEFAULTS,
    text_config_key="text_config", text_model_type="gemma3_text",
    passthrough=("model.vision_tower.", "model.multi_modal_projector."),
    legacy_prefixes=(("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")))
