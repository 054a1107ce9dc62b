"""`kto-jax online --example=DIR`: what configs/online_tiny_cpu.py needs, made on the spot.

configs/online_tiny_cpu.py names no model, prompts or judge. `write_example(DIR)` writes
  DIR/tiny-model/     a random 2-layer Llama (hidden 32) with a byte-level BPE tokenizer
                      trained here on the prompts' words: an HF directory, written by
                      kto-jax itself (no torch, no hub)
  DIR/prompts.jsonl   16 plain-text prompts
and names a judge that ships with kto-jax, `distinct_letters` below, so that

  kto-jax online --config=configs/online_tiny_cpu.py --workdir=DIR/run \\
      --config.model.path=DIR/tiny-model --config.online.prompts_path=DIR/prompts.jsonl \\
      --config.online.judge=kto_jax.online.example:distinct_letters

runs two rounds in about a minute on a laptop CPU. The model is random, so its numbers
show the mechanics (files, rounds, resume, the plot), not alignment.
"""

from __future__ import annotations

import json
import os
import random
import string

MODEL_DIR = "tiny-model"
PROMPTS_FILE = "prompts.jsonl"
JUDGE = "kto_jax.online.example:distinct_letters"
WORDS = ("the cat dog sat ran on a mat log red blue big small happy sad tree house car road "
         "sun moon star sky good bad fast slow yes no what why how when where who").split()
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def distinct_letters(prompt: str, completion: str) -> float:  # pylint: disable=unused-argument
    """The example judge: distinct letters a-z in the completion, over 8, at most 1."""
    return min(1.0, len(set(completion.lower()) & set(string.ascii_lowercase)) / 8)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_tokenizer(out_dir: str, corpus: list[str]):
    """A byte-level BPE tokenizer (vocab ~300) with <pad>, <s>, </s>, saved to `out_dir`."""
    from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
    from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,  # pylint: disable=protected-access
                                        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def write_example(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Writes the tiny model and the prompts into `out_dir`; returns the config overrides."""
    from kto_jax.models import ModelConfig, init_model, save_pretrained  # pylint: disable=import-outside-toplevel
    rng = random.Random(seed)
    out_dir = os.path.abspath(out_dir)   # the command it prints works from any directory
    model_dir, prompts_file = os.path.join(out_dir, MODEL_DIR), os.path.join(out_dir, PROMPTS_FILE)
    os.makedirs(model_dir, exist_ok=True)
    prompts = [_sentence(rng, 2, 6) + " ?" for _ in range(16)]
    tokenizer = write_tokenizer(model_dir, prompts + [_sentence(rng, 3, 12) for _ in range(400)])
    config = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokenizer),
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **TINY})
    save_pretrained(init_model(config, seed=seed), model_dir, tokenizer=tokenizer)
    with open(prompts_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return {"model.path": model_dir, "online.prompts_path": prompts_file, "online.judge": JUDGE}


def example_command(overrides: dict[str, str], workdir: str) -> str:
    """The `kto-jax online` command line that runs configs/online_tiny_cpu.py on them
    (the config as configs/... from the checkout's root, else by its absolute path)."""
    from kto_jax.config import CONFIGS_DIR  # pylint: disable=import-outside-toplevel
    config = os.path.join(CONFIGS_DIR, "online_tiny_cpu.py")
    relative = os.path.relpath(config)
    config = config if relative.startswith("..") else relative
    flags = " ".join(f"--config.{key}={value}" for key, value in overrides.items())
    return f"kto-jax online --config={config} --workdir={workdir} {flags}"
