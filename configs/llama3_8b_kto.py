"""Llama-3 8B aligned with KTO alone (no SFT first): the paper's Table 1 recipe.

Table 1: AdamW, lr 5e-6, beta 0.10, effective batch 32, lambda_D = lambda_U = 1.
Set --config.model.path to a local Meta-Llama-3-8B HF directory and
--config.data.train_path to the feedback. Sized for a TPU pod slice or an 8-GPU
host: parameters and optimizer state sharded over every device (fsdp), bf16
compute with fp32 master weights, bf16 reference, full rematerialisation.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("base")
    c.model.preset = "llama3_8b"      # architecture for `kto-jax compile` without a checkpoint
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.reference.source = "model"
    c.reference.param_dtype = "bfloat16"
    c.loss.name = "kto"
    c.loss.beta = 0.10
    c.optim.name = "adamw"
    c.optim.lr = 5e-6
    c.optim.warmup_steps = 10
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.bucket_lengths = (512, 1024, 2048)
    c.train.global_batch_size = 32
    c.train.micro_batch_size = 16
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
