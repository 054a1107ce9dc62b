"""Tiny CPU run: a few steps in seconds; the config the tests train with.

It needs a model and data, which it does not name: pass a small HF checkpoint and
a feedback file, e.g.
  kto-jax train --config=configs/tiny_cpu.py --workdir=/tmp/run \\
      --config.model.path=/path/to/tiny-llama --config.data.train_path=feedback.jsonl
The tests build a random 2-layer Llama (hidden 32, vocab < 512) with transformers
and torch, save it and its tokenizer to a temporary directory, and pass that
directory as --config.model.path (tests/tiny_models.py). Everything is float32
so a resumed run reproduces an uninterrupted one bit for bit.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("base")
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.reference.param_dtype = "float32"

    c.data.max_length = 48
    c.data.max_prompt_length = 24
    c.data.bucket_lengths = (48,)
    c.data.eval_fraction = 0.2
    c.data.prefetch = 0

    c.optim.lr = 1e-3                 # a random tiny model moves visibly in a few steps
    c.optim.warmup_steps = 2

    c.train.global_batch_size = 8
    c.train.micro_batch_size = 4      # 2 accumulation microbatches per step
    c.train.num_steps = 6
    c.train.log_every = 1
    c.train.eval_every = 3

    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    return c
