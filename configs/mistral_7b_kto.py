"""Mistral-7B aligned with KTO (section 4.3, Table 3: OpenAssistant).

The paper gives no Table 1 row for Mistral; this uses its KTO defaults: AdamW,
lr 5e-6, beta 0.1, lambda_D = lambda_U = 1, effective batch 32 (section 4.2, App. C).
For the one-y-per-x variant of Table 3 add --config.data.one_y_per_x=True.
--config.model.path: a local Mistral-7B-v0.1 HF directory.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("llama3_8b_kto")
    c.model.preset = "mistral_7b"     # architecture for `kto-jax compile` without a checkpoint
    c.loss.beta = 0.10
    return c
