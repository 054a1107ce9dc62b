"""Llama-3 8B SFT+KTO: KTO on a model already fine-tuned (SFT) on the desirable data.

Table 1: lr 5e-6, beta 0.05 (lower beta suits models that have undergone SFT,
section 4.2). --config.model.path is the SFT checkpoint (e.g. the export of a
configs/llama3_8b_sft.py run), which is also the reference.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("llama3_8b_kto")
    c.loss.beta = 0.05
    return c
