"""Online rounds on a tiny model in seconds on CPU: the config the online tests use.

Like configs/tiny_cpu.py it names no model, prompts or judge. `kto-jax online
--example=DIR` writes a random tiny model and prompts to DIR and prints the command that
runs this config on them with a judge that ships with kto-jax. The tests build a random
2-layer Llama (tests/tiny_models.py), write a prompt file and pass a
`module:function` judge, e.g.
  kto-jax online --config=configs/online_tiny_cpu.py --workdir=/tmp/online \\
      --config.model.path=/path/to/tiny-llama --config.online.prompts_path=prompts.jsonl \\
      --config.online.judge=my_judges:score
Everything is float32 so a resumed run reproduces an uninterrupted one bit for bit.
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("tiny_cpu")
    c.online.rounds = 2
    c.online.samples_per_prompt = 4
    c.online.steps_per_round = 2
    c.online.max_new_tokens = 8
    c.online.temperature = 1.0
    c.online.sample_batch_size = 16
    c.online.heldout_fraction = 0.25
    c.online.threshold = 0.5
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.num_steps = 0             # unused: online.rounds * online.steps_per_round steps
    c.checkpoint.async_save = False
    return c
