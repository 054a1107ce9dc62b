"""Llama-3 8B supervised fine-tuning on the desirable outputs: the SFT of SFT+KTO.

SFT needs no reference model. The learning rate is the paper's 5e-6 (section 4.2);
export the result (WORKDIR/hf) and pass it as --config.model.path to
configs/llama3_8b_sft_kto.py.
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
    c.loss.name = "sft"
    c.reference.source = "none"
    c.optim.lr = 5e-6
    return c
