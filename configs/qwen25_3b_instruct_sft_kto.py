"""Qwen2.5 3B Instruct SFT+KTO: the paper's Table 1 recipe (lr 5e-6, beta 0.10).

--config.model.path: the SFT checkpoint of Qwen2.5-3B-Instruct on the desirable data.
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
    c.loss.beta = 0.10
    return c
