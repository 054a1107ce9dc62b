"""Qwen2.5 3B Instruct aligned with KTO alone: the paper's Table 1 recipe.

Table 1: AdamW, lr 5e-6, beta 0.50 (KTO without SFT first), effective batch 32.
--config.model.path: a local Qwen2.5-3B-Instruct HF directory.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("llama3_8b_kto")
    c.model.preset = "qwen25_3b"      # architecture for `kto-jax compile` without a checkpoint
    c.loss.beta = 0.50
    c.model.remat_policy = "dots"
    return c
