"""`kto-jax train` with config.lora on tiny_cpu: SIGKILL-and-resume, checkpoint contents,
`kto-jax export --format=merged|peft` against the real `peft` package, lora.init_from,
and config.lora errors before any compile.

Every run is a real `python -m kto_jax.cli` subprocess on 4 CPU devices sharing the
session's compilation cache (tests/train/conftest.py).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from run_helpers import (NUM_STEPS, REPO, cli_env, kill_after_checkpoint, metrics, run_cli, tensors,
                         train_argv)
from kto_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier

LORA = ("--config.lora.rank=4", "--config.lora.alpha=8.0")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, feedback_file, compile_cache):
    """The workdir of one uninterrupted LoRA run (rank 4, all seven targets)."""
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    run_cli(train_argv(workdir, tiny_model_dir, feedback_file, *LORA), cli_env(compile_cache))
    return workdir


@pytest.fixture(scope="module")
def lora_exports(lora_run, compile_cache, tmp_path_factory):
    """`kto-jax export` of the LoRA run, merged and as a PEFT adapter: {format: directory}."""
    out = tmp_path_factory.mktemp("lora_exports")
    exports = {"merged": str(out / "merged"), "peft": str(out / "peft")}
    env = cli_env(compile_cache)
    run_cli([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", lora_run, "--out",
             exports["merged"]], env)
    run_cli([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", lora_run, "--out",
             exports["peft"], "--format=peft"], env)
    return exports


def test_lora_run_checkpoints_only_adapters_and_resumes_bit_for_bit(
        lora_run, tiny_model_dir, feedback_file, compile_cache, tmp_path):
    # the saved state's arrays: adapter factors and their moments, no base or reference weights
    meta = os.path.join(lora_run, "checkpoints", str(NUM_STEPS), "state", "_METADATA")
    with open(meta, encoding="utf-8") as f:
        keys = list(json.load(f)["tree_metadata"])
    variables = [k for k in keys if k.endswith("'value')")]  # every nnx Variable saved
    assert len(variables) == 3 * 14 and all("_lora_" in k for k in variables)  # A, B x 7; mu, nu
    assert not any(k.startswith(("('base_params', ", "('reference_params', ")) for k in keys)

    workdir = str(tmp_path / "killed")
    argv = train_argv(workdir, tiny_model_dir, feedback_file, *LORA)
    kill_after_checkpoint(argv, cli_env(compile_cache), workdir)
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) < NUM_STEPS
    proc = run_cli(argv, cli_env(compile_cache))
    assert "resuming from step" in proc.stderr
    assert metrics(workdir) == metrics(lora_run)
    assert metrics(workdir, "eval_metrics.jsonl") == metrics(lora_run, "eval_metrics.jsonl")
    a, b = tensors(os.path.join(workdir, "hf")), tensors(os.path.join(lora_run, "hf"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)


def test_peft_export_loads_onto_the_original_model_and_matches_the_merged_export(
        lora_run, lora_exports, tiny_model_dir):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    merged_dir, peft_dir = lora_exports["merged"], lora_exports["peft"]
    a, b = tensors(merged_dir), tensors(os.path.join(lora_run, "hf"))  # end-of-run export = merged
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
    base = tensors(tiny_model_dir)
    assert any(not np.array_equal(a[k], base[k]) for k in base if "q_proj" in k)  # trained deltas

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        merged = load(merged_dir)(ids).logits.numpy()
        with_peft = peft.PeftModel.from_pretrained(load(tiny_model_dir), peft_dir).eval()
        via_peft = with_peft(ids).logits.numpy()
        plain = load(tiny_model_dir)(ids).logits.numpy()
    np.testing.assert_allclose(via_peft, merged, atol=1e-4)
    assert np.abs(plain - merged).max() > 1e-4  # the adapters changed the model


def test_init_from_a_peft_adapter_is_the_frozen_reference(lora_exports, tiny_model_dir, feedback_file,
                                                           compile_cache, tmp_path):
    """Starting from an adapter (here the PEFT export of the LoRA run): the policy starts at
    base + adapter, which is also the reference, so the first step's rewards and KL are 0."""
    env = cli_env(compile_cache)
    adapter = lora_exports["peft"]
    workdir = str(tmp_path / "from_adapter")
    argv = train_argv(workdir, tiny_model_dir, feedback_file, f"--config.lora.init_from={adapter}",
                      "--config.train.num_steps=2", "--config.train.eval_every=0")
    run_cli(argv, env)
    first = metrics(workdir)[0]
    assert abs(first["kl"]) < 1e-5 and abs(first["rewards/margins"]) < 1e-5, first
    from kto_jax.models import lora, lora_io
    assert lora_io.read_peft_config(adapter).rank == 4
    assert set(lora.TARGET_MODULES) == set(lora_io.read_peft_config(adapter).target_modules)


@pytest.mark.parametrize("flag, message", [
    ("--config.lora.rank=-2", "config.lora.rank=-2"),
    ("--config.lora.rank=4 --config.lora.target_modules=q_proj,w_proj", "config.lora.target_modules"),
    ("--config.lora.init_from=/nonexistent/adapter", "config.lora.init_from"),
])
def test_bad_lora_settings_fail_with_one_line_before_any_compile(flag, message, tiny_model_dir,
                                                                 feedback_file, compile_cache, tmp_path):
    argv = train_argv(str(tmp_path / "bad"), tiny_model_dir, feedback_file, *flag.split())
    proc = subprocess.run(argv, env=cli_env(compile_cache), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
