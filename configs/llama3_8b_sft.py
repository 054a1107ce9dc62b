"""Llama-3 8B supervised fine-tuning on the desirable outputs: the SFT of SFT+KTO.

SFT needs no reference model. The learning rate is the paper's 5e-6 (section 4.2);
export the result (WORKDIR/hf) and pass it as --config.model.path to
configs/llama3_8b_sft_kto.py.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("llama3_8b_kto")
    c.loss.name = "sft"
    c.reference.source = "none"
    c.optim.lr = 5e-6
    return c
