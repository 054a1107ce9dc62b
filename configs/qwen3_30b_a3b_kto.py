"""Qwen3-30B-A3B (a mixture of experts: 128 experts of which 8 per token, 3.3B of its 30.5B
parameters active) aligned with KTO through LoRA adapters: sized for a TPU v5e-8.

LoRA rank 16 on the attention projections (q, k, v, o) of every layer: a mixture of
experts has no dense MLP, and its experts and router stay frozen (docs/models.md,
"Mixtures of experts"). The bf16 base is frozen and serves the policy, its KL forward and
the reference (no second copy); the router's load-balancing loss is the checkpoint's
(router_aux_loss_coef 0.001). KTO at the paper's beta 0.10, effective batch 32. Set
--config.model.path to a local Qwen/Qwen3-30B-A3B HF directory, or its hub id, and
--config.data.train_path to the feedback. Base sharded over every chip (fsdp), bf16
compute, full rematerialisation, prompts and completions up to 1024 tokens each, a
microbatch of 8 (1 per chip) x 4 accumulation steps. Every parameter (full KTO) needs a
bigger slice, and one microbatch per step (a float32 gradient accumulator does not fit
next to the gradient): --config.lora.rank=0 --config.model.param_dtype=float32
--config.train.micro_batch_size=16 --config.train.global_batch_size=16 on a v5p-16
(docs/tpu.md lists both).
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("base")
    c.model.preset = "qwen3_30b_a3b"  # architecture for `kto-jax compile` without a checkpoint
    c.model.param_dtype = "bfloat16"  # the frozen base
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention: the experts stay frozen
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
