"""`kto-jax online` with QLoRA: the rounds sample from the NF4 base + adapters (the sampler
dequantises one layer at a time like the step), train the adapters, and export merged."""

import numpy as np
import pytest

from online_helpers import online_argv, online_env
from run_helpers import run_cli
from test_online_run import _rows, _weights

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier


def test_online_rounds_on_an_nf4_base(tmp_path, prompts_file, compile_cache):
    from tiny_models import write_nf4_model_dir
    model_dir = write_nf4_model_dir(str(tmp_path / "nf4_llama"))
    workdir = str(tmp_path / "online_qlora")
    proc = run_cli(online_argv(workdir, model_dir, prompts_file, "--config.lora.rank=4", "--config.lora.alpha=8.0",
                               "--config.lora.base_quantization=nf4"), online_env(compile_cache))
    assert "stored nf4" in proc.stderr and "the reference is the base with the adapters off" in proc.stderr
    rows = _rows(workdir)
    rounds = [r for r in rows if r["kind"] == "round"]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["kl_ref"] == 0.0                     # B = 0: the policy is the (NF4) reference
    assert train and train[0]["kl"] == 0.0 and rounds[-1]["kl_ref"] != 0.0
    merged = _weights(workdir)
    from safetensors.numpy import load_file
    original = load_file(f"{model_dir}/model.safetensors")
    assert merged.keys() == original.keys()
    assert all(np.array_equal(merged[k], original[k]) for k in original if "norm" in k or "embed" in k)
    assert not any(np.array_equal(merged[k], original[k]) for k in original if "proj" in k)
