"""`kto-jax train` with QLoRA (an NF4 base with double quantisation, LoRA r4) on tiny_cpu:
SIGKILL-and-resume reproduces the uninterrupted run bit for bit, the checkpoint holds the
adapters only, the merged export is the dequantised base + the adapters' delta (against
a hand computation from the PEFT export's factors), and peft loads the PEFT export onto
the ORIGINAL unquantised checkpoint."""

import glob
import json
import os
import sys

import numpy as np
import pytest

from run_helpers import cli_env, kill_after_checkpoint, metrics, run_cli, tensors, train_argv
from kto_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier

QLORA = ("--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.lora.base_quantization=nf4",
         "--config.lora.double_quant=True")


@pytest.fixture(scope="module")
def nf4_model_dir(tmp_path_factory):
    from tiny_models import write_nf4_model_dir
    return write_nf4_model_dir(str(tmp_path_factory.mktemp("nf4_llama")))


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, nf4_model_dir, feedback_file, compile_cache):
    workdir = str(tmp_path_factory.mktemp("qlora_run"))
    proc = run_cli(train_argv(workdir, nf4_model_dir, feedback_file, *QLORA), cli_env(compile_cache))
    assert "nf4 + double quantisation" in proc.stderr, proc.stderr
    return workdir


def test_qlora_run_checkpoints_only_adapters_and_resumes_bit_for_bit(
        qlora_run, nf4_model_dir, feedback_file, compile_cache, tmp_path):
    step = max(int(d) for d in os.listdir(os.path.join(qlora_run, "checkpoints")) if d.isdigit())
    with open(os.path.join(qlora_run, "checkpoints", str(step), "state", "_METADATA"), encoding="utf-8") as f:
        keys = list(json.load(f)["tree_metadata"])
    variables = [k for k in keys if k.endswith("'value')")]
    assert variables and all("_lora_" in k for k in variables)   # no codes, no scales, no base
    workdir = str(tmp_path / "killed")
    argv = train_argv(workdir, nf4_model_dir, feedback_file, *QLORA)
    kill_after_checkpoint(argv, cli_env(compile_cache), workdir)
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) < len(metrics(qlora_run))
    proc = run_cli(argv, cli_env(compile_cache))
    assert "resuming from step" in proc.stderr
    assert metrics(workdir) == metrics(qlora_run)
    assert metrics(workdir, "eval_metrics.jsonl") == metrics(qlora_run, "eval_metrics.jsonl")
    a, b = tensors(os.path.join(workdir, "hf")), tensors(os.path.join(qlora_run, "hf"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)


def test_exports_merged_on_the_dequantised_base_and_peft_on_the_original(
        qlora_run, nf4_model_dir, compile_cache, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import jax.numpy as jnp
    import transformers
    from safetensors.numpy import load_file
    from kto_jax.models import params as table
    from kto_jax.models import quantize as qz
    from kto_jax.models.quantized_base import Quantization, load_quantized
    peft_dir = str(tmp_path / "peft")
    run_cli([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", qlora_run, "--out", peft_dir,
             "--format=peft"], cli_env(compile_cache))
    with open(os.path.join(peft_dir, "adapter_config.json"), encoding="utf-8") as f:
        adapter_config = json.load(f)
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(nf4_model_dir)
    factors = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    merged = tensors(os.path.join(qlora_run, "hf"))   # the end-of-run export: float32 (tiny_cpu)
    original = {k: v for p in glob.glob(f"{nf4_model_dir}/*.safetensors") for k, v in load_file(p).items()}
    base = load_quantized(nf4_model_dir, Quantization("nf4", double_quant=True))
    rows = {row.path[-1]: row for row in table.param_table(base.config)}
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    for name, weight in base.layers.items():
        dequantized = np.asarray(qz.dequantize(weight, jnp.float32), np.float64)   # [L, *ours]
        for i, hf_name in enumerate(rows[name].hf_names(base.config.num_layers)):
            key = "base_model.model." + hf_name.removesuffix(".weight")
            delta = scale * factors[key + ".lora_B.weight"].astype(np.float64) @ factors[key + ".lora_A.weight"]
            hand = table.to_hf(rows[name].transform, dequantized[i]) + delta
            np.testing.assert_allclose(merged[hf_name], hand, rtol=0, atol=1e-6 * np.abs(hand).max())
            assert np.abs(delta).max() > 1e-5                               # trained
            assert not np.array_equal(merged[hf_name], original[hf_name])  # NF4's rounding is in it
    for k in original:
        if "norm" in k or "embed" in k or "lm_head" in k:
            np.testing.assert_array_equal(merged[k], original[k])

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(load(nf4_model_dir), peft_dir).eval()(ids).logits.numpy()
        plain = load(nf4_model_dir)(ids).logits.numpy()
        on_nf4 = load(os.path.join(qlora_run, "hf"))(ids).logits.numpy()
    assert np.isfinite(via_peft).all() and np.abs(via_peft - plain).max() > 1e-5   # the adapters, on the original
    assert np.abs(via_peft - on_nf4).max() > 1e-4                                  # not on the NF4 base
