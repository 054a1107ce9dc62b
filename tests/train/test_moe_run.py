"""A tiny Qwen3-MoE (4 experts, top 2, load-balancing loss on) through `kto-jax train`: the
router's loss is logged apart, a SIGKILLed packed run resumes bit for bit, two processes
train like one, and the export loads in transformers as the same architecture.

CLI subprocesses on 4 CPU devices (slow); the model-level checks are tests/models/test_moe.py's
and test_hf_io.py's.
"""

import json
import os

import numpy as np
import pytest

from run_helpers import (PACKING, assert_metrics_like, assert_resume_is_bitwise, cli_env, run_cli,
                         run_two_processes, tensors, train_argv, write_feedback)
from kto_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(model dir, feedback file) of the tiny mixture of experts."""
    pytest.importorskip("torch")
    from tiny_models import write_moe_model_dir
    root = tmp_path_factory.mktemp("moe")
    data = str(root / "feedback.jsonl")
    write_feedback(data, 80, seed=2)
    return write_moe_model_dir(str(root / "model")), data


@pytest.fixture(scope="module")
def moe_run(moe, compile_cache, tmp_path_factory) -> str:
    """One uninterrupted packed run (the comparison of the others)."""
    workdir = str(tmp_path_factory.mktemp("moe_run"))
    run_cli(train_argv(workdir, *moe, *PACKING), cli_env(compile_cache))
    return workdir


def test_moe_run_logs_the_router_loss_and_exports_the_architecture(moe, moe_run):
    transformers = pytest.importorskip("transformers")
    lines = read_jsonl(os.path.join(moe_run, "metrics.jsonl"))
    assert all(0.0 < line["router_aux_loss"] < 10.0 for line in lines)
    hf = os.path.join(moe_run, "hf")
    exported, original = tensors(hf), tensors(moe[0])
    assert exported.keys() == original.keys()
    assert any(not np.array_equal(exported[k], original[k]) for k in original if ".experts." in k)
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["router_aux_loss_coef"] == 0.01
    model, info = transformers.AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and not info["missing_keys"]


def test_moe_sigkill_then_resume_is_bitwise(moe, moe_run, compile_cache, tmp_path):
    workdir = str(tmp_path / "killed")
    assert_resume_is_bitwise(train_argv(workdir, *moe, *PACKING), cli_env(compile_cache), workdir,
                             moe_run)


def test_two_moe_processes_match_one(moe, moe_run, compile_cache, tmp_path):
    workdir = str(tmp_path / "two")
    run_two_processes(train_argv(workdir, *moe, *PACKING), compile_cache)
    assert_metrics_like(workdir, moe_run)
