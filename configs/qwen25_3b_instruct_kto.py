"""Qwen2.5 3B Instruct aligned with KTO alone: the paper's Table 1 recipe.

Table 1: AdamW, lr 5e-6, beta 0.50 (KTO without SFT first), effective batch 32.
--config.model.path: a local Qwen2.5-3B-Instruct HF directory.
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
    c.model.preset = "qwen25_3b"      # architecture for `kto-jax compile` without a checkpoint
    c.loss.beta = 0.50
    c.model.remat_policy = "dots"
    return c
