"""Fixtures for the data tests: a tiny local tokenizer with a chat template, configs, files.

The tokenizer is tests/tiny_models.py's "llama_chat" kind: a byte-level BPE trained there
(vocab 320), wrapped as a transformers fast tokenizer that adds BOS like Llama does and
carries a ChatML chat template; it is saved to a temporary directory so the CLI can load
it. Nothing touches a hub.
"""

import importlib.util
import json
import os
import random

import pytest

import tiny_models
from tiny_models import CHATML, WORDS, sentence  # noqa: F401  (the data tests import them from here)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tokenizer"))
    tiny_models.tokenizer("llama_chat").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def base_config(**overrides):
    """configs/base.py with `section.key=value` overrides, sized for fast tests."""
    spec = importlib.util.spec_from_file_location("kto_jax_configs_base_for_data_tests",
                                                  os.path.join(ROOT, "configs", "base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.bucket_lengths = (16, 32, 64)
    c.data.eval_fraction = 0.0
    c.data.prefetch = 0
    c.train.global_batch_size = 8
    c.train.micro_batch_size = 4
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def unpaired_rows(n: int, seed: int = 0, desirable_every: int = 2):
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, 2, 10) + " ?", "completion": sentence(rng, 1, 14),
             "label": i % desirable_every == 0} for i in range(n)]


def paired_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, 2, 8), "chosen": sentence(rng, 1, 10),
             "rejected": sentence(rng, 1, 10)} for _ in range(n)]


def conversation(rng: random.Random):
    return ([{"role": "user", "content": sentence(rng, 2, 8)}],
            [{"role": "assistant", "content": sentence(rng, 1, 8)}])
