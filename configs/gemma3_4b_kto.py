"""Gemma 3 4B aligned with KTO, every parameter trained: sized for a TPU v5e-8.

The paper's defaults for KTO alone: AdamW, lr 5e-6, beta 0.10, effective batch 32,
lambda_D = lambda_U = 1. Set --config.model.path to a local google/gemma-3-4b-pt (or -it)
HF directory, or its hub id, and --config.data.train_path to the feedback. The
checkpoint is multimodal (Gemma3ForConditionalGeneration): its language model is
trained, the export carries the vision tower through unchanged (docs/models.md).
Parameters and optimizer state sharded over every chip (fsdp), bf16 compute with fp32
master weights, bf16 reference, full rematerialisation, prompts and completions
up to 1024 tokens each, a microbatch of 8 (1 per chip) x 4 accumulation steps:
`kto-jax compile` on a v5e-8 puts it at the per-chip memory docs/tpu.md lists (a
microbatch of 16 compiles too, at 96% of the chip's 16 GiB: no margin).
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("base")
    c.model.preset = "gemma3_4b"      # architecture for `kto-jax compile` without a checkpoint
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
    c.data.max_completion_length = 1024  # prompt + completion <= 2048 (the compile's worst case)
    c.data.bucket_lengths = (512, 1024, 2048)
    c.train.global_batch_size = 32
    c.train.micro_batch_size = 8       # 1 per chip on a v5e-8 (docs/tpu.md)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
