"""Llama-3 8B aligned with DPO: the baseline KTO is compared with.

DPO defaults (Rafailov et al., as the paper's App. C keeps them): beta 0.1,
lr 5e-7. Data: paired preferences (prompt, chosen, rejected).
"""

import importlib.util
import os

import ml_collections


def _sibling(name: str):
    """Loads configs/<name>.py by path: configs are files, not an importable package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kto_jax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    c = _sibling("llama3_8b_kto").get_config()
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.optim.lr = 5e-7
    c.data.format = "paired"
    c.train.micro_batch_size = 8      # two sequences (chosen, rejected) per example
    return c
