"""Gemma 3 27B aligned with KTO through LoRA adapters: sized for a TPU v5e-8.

LoRA rank 16 on all seven projections of every layer (docs/lora.md): the bf16 base is
frozen and serves the policy, its KL forward and the reference (no second copy), only
the adapters and their Adam moments are trained. KTO alone at the paper's beta 0.10,
effective batch 32; adapters take a higher learning rate than full fine-tuning (5e-5).
Set --config.model.path to a local google/gemma-3-27b-pt (or -it) HF directory, or its
hub id, and --config.data.train_path to the feedback. The checkpoint is multimodal
(Gemma3ForConditionalGeneration): the adapters sit on its language model, the export
carries the vision tower through unchanged. Base sharded over every chip (fsdp), bf16
compute, full rematerialisation, prompts and completions up to 1024 tokens each, a
microbatch of 8 (1 per chip) x 4 accumulation steps: `kto-jax compile` on a v5e-8 puts
it at the per-chip memory docs/tpu.md lists.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("base")
    c.model.preset = "gemma3_27b"     # architecture for `kto-jax compile` without a checkpoint
    c.model.param_dtype = "bfloat16"  # the frozen base
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.reference.source = "model"      # the base itself under LoRA
    c.reference.param_dtype = "bfloat16"
    c.loss.name = "kto"
    c.loss.beta = 0.10
    c.optim.name = "adamw"
    c.optim.lr = 5e-5
    c.optim.warmup_steps = 10
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.max_completion_length = 1024  # prompt + completion <= 2048 (the compile's worst case)
    c.data.bucket_lengths = (512, 1024, 2048)
    c.train.global_batch_size = 32
    c.train.micro_batch_size = 8      # 1 per chip on a v5e-8 (docs/tpu.md)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
