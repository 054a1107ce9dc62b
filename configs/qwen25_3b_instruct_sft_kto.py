"""Qwen2.5 3B Instruct SFT+KTO: the paper's Table 1 recipe (lr 5e-6, beta 0.10).

--config.model.path: the SFT checkpoint of Qwen2.5-3B-Instruct on the desirable data.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("qwen25_3b_instruct_kto")
    c.loss.beta = 0.10
    return c
