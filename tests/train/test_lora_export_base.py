"""A LoRA run's PEFT export loads in one line, `AutoPeftModelForCausalLM.from_pretrained(DIR)`
(the real peft), whatever the run's base: a hub id (resolved offline from a hub cache, which
also shows `kto-jax train` taking a hub id), or a llama.cpp .gguf file, which the export
writes as an HF checkpoint to DIR/base and names."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from hub_cache import place_in_hub_cache
from run_helpers import REPO, cli_env, run_cli, train_argv
from kto_jax.train.export import PEFT_BASE_DIR, peft_base_name

LORA = ("--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.train.num_steps=4",
        "--config.checkpoint.every_steps=4", "--config.train.eval_every=0")
REPO_ID = "kto-jax-test/tiny-llama"
IDS = [[5, 9, 17, 33, 2, 40, 41, 7]]
# Loads DIR with the one line of docs/lora.md and prints its logits for IDS.
PEFT_ONE_LINER = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))
"""


def _logits_via_peft(adapter_dir: str, env: dict) -> np.ndarray:
    proc = subprocess.run([sys.executable, "-c", PEFT_ONE_LINER, adapter_dir, json.dumps(IDS)],
                          env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.asarray(json.loads(proc.stdout.strip().splitlines()[-1]))


def _logits_of(hf_dir: str) -> np.ndarray:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _export(workdir: str, out: str, env: dict, *flags: str) -> subprocess.CompletedProcess:
    return run_cli([sys.executable, "-m", "kto_jax.cli", "export", f"--workdir={workdir}",
                    f"--out={out}", *flags], env)


def test_a_local_base_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert peft_base_name("models/base") == str(tmp_path / "models" / "base")
    assert peft_base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_base_name("gs://bucket/model") == "gs://bucket/model"


@pytest.mark.slow
def test_a_run_from_a_hub_id_exports_an_adapter_naming_the_id(tiny_model_dir, feedback_file,
                                                              compile_cache, tmp_path):
    pytest.importorskip("peft")
    cache = str(tmp_path / "hub")
    place_in_hub_cache(tiny_model_dir, cache, REPO_ID)
    env = cli_env(compile_cache, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1")
    workdir, adapter = str(tmp_path / "run"), str(tmp_path / "adapter")
    run_cli(train_argv(workdir, REPO_ID, feedback_file, *LORA), env)
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model"]["path"] == REPO_ID          # the id, not this machine's cache
    _export(workdir, adapter, env, "--format=peft")
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == REPO_ID
    via_peft = _logits_via_peft(adapter, env)
    merged = _logits_of(os.path.join(workdir, "hf"))             # the end-of-run (merged) export
    np.testing.assert_allclose(via_peft, merged, atol=1e-4)
    assert np.abs(_logits_of(tiny_model_dir) - merged).max() > 1e-4   # the adapters trained


def _tiny_gguf(path: str) -> None:
    spec = importlib.util.spec_from_file_location(
        "gguf_test_helpers", os.path.join(REPO, "tests", "models", "test_gguf.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    vocab = len(helpers.byte_level_tokens(helpers.TINY_MERGES, helpers.TINY_SPECIALS))
    config, state_dict = helpers.tiny_llama(vocab)
    helpers.write_llama_gguf(path, config, helpers.to_gguf_tensors(config, state_dict))


@pytest.mark.slow
def test_a_gguf_base_is_written_as_an_hf_checkpoint_the_adapter_names(compile_cache, tmp_path):
    pytest.importorskip("peft")
    gguf_file, data = str(tmp_path / "tiny.gguf"), tmp_path / "feedback.jsonl"
    _tiny_gguf(gguf_file)
    rng = random.Random(0)
    words = "the hello tell hell he".split()
    data.write_text("".join(json.dumps({"prompt": " ".join(rng.choices(words, k=2)),
                                        "completion": " ".join(rng.choices(words, k=3)),
                                        "label": bool(i % 3)}) + "\n" for i in range(48)))
    env = cli_env(compile_cache)
    workdir, adapter = str(tmp_path / "run"), str(tmp_path / "adapter")
    run_cli(train_argv(workdir, gguf_file, str(data), *LORA), env)
    proc = _export(workdir, adapter, env, "--format=peft")
    base = os.path.join(adapter, PEFT_BASE_DIR)
    assert f"wrote it as an HF checkpoint to {base}" in proc.stdout
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == base
    assert os.path.isfile(os.path.join(base, "config.json"))
    via_peft = _logits_via_peft(adapter, env)
    merged = _logits_of(os.path.join(workdir, "hf"))
    np.testing.assert_allclose(via_peft, merged, atol=1e-4)
    assert np.abs(_logits_of(base) - merged).max() > 1e-4
