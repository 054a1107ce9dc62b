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


EXPERT_LORA = ("--config.lora.rank=4", "--config.lora.target_modules=q_proj,expert_gate_up_proj,expert_down_proj")


@pytest.fixture(scope="module")
def expert_lora_run(moe, compile_cache, tmp_path_factory) -> str:
    """One uninterrupted run with LoRA on q and every expert's gate/up/down."""
    workdir = str(tmp_path_factory.mktemp("expert_lora_run"))
    run_cli(train_argv(workdir, *moe, *EXPERT_LORA), cli_env(compile_cache))
    return workdir


def test_expert_lora_trains_the_experts_and_resumes_bitwise(moe, expert_lora_run, compile_cache, tmp_path):
    """The merged export's expert tensors moved (the adapters trained), the router's did not;
    a SIGKILLed run resumes to the same metrics and export, bit for bit."""
    exported, original = tensors(os.path.join(expert_lora_run, "hf")), tensors(moe[0])
    assert any(not np.array_equal(exported[k], original[k]) for k in original if ".experts." in k)
    routers = [k for k in original if k.endswith("mlp.gate.weight")]
    assert routers and all(np.array_equal(exported[k], original[k]) for k in routers)
    workdir = str(tmp_path / "killed")
    assert_resume_is_bitwise(train_argv(workdir, *moe, *EXPERT_LORA), cli_env(compile_cache), workdir,
                             expert_lora_run)
