"""Llama-3 8B SFT+KTO: KTO on a model already fine-tuned (SFT) on the desirable data.

Table 1: lr 5e-6, beta 0.05 (lower beta suits models that have undergone SFT,
section 4.2). --config.model.path is the SFT checkpoint (e.g. the export of a
configs/llama3_8b_sft.py run), which is also the reference.
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
    c.loss.beta = 0.05
    return c
