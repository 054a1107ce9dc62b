"""Mistral-7B aligned with DPO on pairs: the DPO row of the paper's Table 3.

beta 0.1, lr 5e-7 (Rafailov et al.); --config.model.path: Mistral-7B-v0.1.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("mistral_7b_kto")
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.optim.lr = 5e-7
    c.data.format = "paired"
    c.train.micro_batch_size = 8
    return c
