"""Llama-3 8B aligned with DPO: the baseline KTO is compared with.

DPO defaults (Rafailov et al., as the paper's App. C keeps them): beta 0.1,
lr 5e-7. Data: paired preferences (prompt, chosen, rejected).
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("llama3_8b_kto")
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.optim.lr = 5e-7
    c.data.format = "paired"
    c.train.micro_batch_size = 8      # two sequences (chosen, rejected) per example
    return c
