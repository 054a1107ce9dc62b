"""Qwen2.5 3B Instruct aligned with DPO: the comparison for the Table 1 KTO recipes.

beta 0.1, lr 5e-7 (Rafailov et al.); data: paired preferences.
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
    c = _sibling("qwen25_3b_instruct_kto").get_config()
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.optim.lr = 5e-7
    c.data.format = "paired"
    c.train.micro_batch_size = 8
    return c
