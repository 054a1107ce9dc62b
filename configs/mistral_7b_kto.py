"""Mistral-7B aligned with KTO (section 4.3, Table 3: OpenAssistant).

The paper gives no Table 1 row for Mistral; this uses its KTO defaults: AdamW,
lr 5e-6, beta 0.1, lambda_D = lambda_U = 1, effective batch 32 (section 4.2, App. C).
For the one-y-per-x variant of Table 3 add --config.data.one_y_per_x=True.
--config.model.path: a local Mistral-7B-v0.1 HF directory.
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
    c.model.preset = "mistral_7b"     # architecture for `kto-jax compile` without a checkpoint
    c.loss.beta = 0.10
    return c
