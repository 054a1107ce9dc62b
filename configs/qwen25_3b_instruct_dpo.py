"""Qwen2.5 3B Instruct aligned with DPO: the comparison for the Table 1 KTO recipes.

beta 0.1, lr 5e-7 (Rafailov et al.); data: paired preferences.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("qwen25_3b_instruct_kto")
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.optim.lr = 5e-7
    c.data.format = "paired"
    c.train.micro_batch_size = 8
    return c
