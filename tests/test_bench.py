"""`kto-jax bench`: the workload it builds, its FLOP accounting against TRL's published
figures, and one real (tiny, short) run through the CLI that prints one JSON line."""

import json

import numpy as np
import pytest

from kto_jax import bench
from kto_jax.cli import main as cli_main
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss
from kto_jax.step import flops as flops_lib

FIELDS = ("bench", "jax", "platform", "device", "num_devices", "date", "model", "params", "seq",
          "padded_seq", "global_batch", "steps", "warmup", "median_step_s", "tokens_per_s",
          "model_tflops_per_s", "mfu", "trl_model_tflops_per_s", "trl_mfu", "peak_mem_gib",
          "peak_mem_source", "xla_mem_gib", "compile_s", "loss", "options")


def test_synthetic_batch_is_the_issue_workload_padded_to_buckets():
    opts = bench.BenchOptions(model="tiny")  # defaults: 512 + 511 tokens, 8 x 4, bucket 128
    b = bench.synthetic_batch(opts, vocab_size=6000)
    assert b["prompt_ids"].shape == (4, 8, 512) and b["completion_ids"].shape == (4, 8, 512)
    assert (b["prompt_mask"].sum(-1) == 512).all() and (b["completion_mask"].sum(-1) == 511).all()
    assert (b["completion_mask"][..., -1] == 0).all()  # right padding of the completion
    assert b["desirable"].sum() == 16 and b["valid"].all()
    assert (b["prompt_ids"][b["prompt_mask"] == 1] >= 3).all()
    odd = bench.BenchOptions(prompt_len=300, completion_len=200)
    assert (odd.padded_prompt, odd.padded_completion) == (384, 256)
    b = bench.synthetic_batch(odd, vocab_size=100)
    assert (b["prompt_mask"][..., :84] == 0).all() and (b["prompt_mask"][..., 84:] == 1).all()


def test_trl_flop_convention_reproduces_the_issue_figures():
    """TRL 1.16 on an H200: 1.26 s/step is 26.0k tokens/s and 40% MFU (peak 989 TFLOP/s),
    0.855 s/step precomputed is 38.3k tokens/s. Our TRL-convention count must give the same."""
    opts = bench.BenchOptions(model="llama-1b")
    cfg = bench.model_config(opts)
    n_params = 1_235_814_400  # Llama-3.2-1B, tied embeddings (HF's count)
    seq, g = 1023, 32
    on_the_fly = bench.trl_step_flops(cfg, n_params, 6, g, seq)
    assert g * seq / 1.26 == pytest.approx(26.0e3, rel=2e-3)
    assert g * seq / 0.855 == pytest.approx(38.3e3, rel=2e-3)
    assert on_the_fly / 1.26 / 989e12 == pytest.approx(0.40, abs=0.005)
    # by hand: 6 units x (2 N + 2 L T D) per token x tokens
    assert on_the_fly == pytest.approx(6 * (2 * n_params + 2 * 16 * seq * 2048) * g * seq)
    # the project's own (PaLM) count is close: full T x T attention, padded T = 1024
    dims = flops_lib.ModelDims.from_hf_config(cfg.to_hf())
    palm = flops_lib.step_flops(dims, loss=get_loss("kto"), reference_source="model",
                                global_batch=g, seq_len=1024)
    assert palm / on_the_fly == pytest.approx(1.03, abs=0.01)
    grad, fwd = flops_lib.forward_passes(get_loss("kto"), "precomputed")
    assert 3 * grad + fwd == 4  # TRL's 4 units with precomputed reference log-probs


def test_bad_options_are_user_errors():
    for opts in (bench.BenchOptions(model="gpt-2"), bench.BenchOptions(reference="cached"),
                 bench.BenchOptions(loss="dpo"), bench.BenchOptions(steps=0)):
        with pytest.raises(UserError):
            opts.check()
    assert cli_main(["bench", "--model", "tiny", "--loss", "nope"]) == 2


@pytest.mark.parametrize("reference", ["on_the_fly", "precomputed"])
def test_bench_cli_prints_one_json_line_with_every_field(capsys, reference):
    """A real run on the 8 virtual CPU devices (data-parallel mesh), short sequences."""
    argv = ["bench", "--model", "tiny", "--steps", "2", "--warmup", "1", "--prompt-len", "16",
            "--completion-len", "15", "--bucket", "16", "--reference", reference]
    assert cli_main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert all(k in r for k in FIELDS), set(FIELDS) - set(r)
    assert r["platform"] == "cpu" and r["mfu"] is None and r["num_devices"] == 8
    assert (r["seq"], r["padded_seq"], r["global_batch"], r["steps"]) == (31, 32, 32, 2)
    # tiny: embed 6000 x 64 (tied) + 2 layers x (attention 64*16*(4+2+2)+4*16*64, MLP 3*64*128, 2 norms) + norm
    layer = 64 * 16 * 4 + 2 * 64 * 16 * 2 + 4 * 16 * 64 + 3 * 64 * 128 + 2 * 64
    assert r["params"] == 6000 * 64 + 2 * layer + 64
    assert r["tokens_per_s"] == pytest.approx(32 * 31 / r["median_step_s"], rel=2e-3)
    units = 6 if reference == "on_the_fly" else 4
    assert r["trl_model_tflops_per_s"] == pytest.approx(
        units * (2 * r["params"] + 2 * 2 * 31 * 64) * 32 * 31 / r["median_step_s"] / 1e12, rel=0.02)
    assert np.isfinite(r["loss"]) and 0.3 < r["loss"] < 0.7  # random init: about sigmoid(0)=0.5
    assert r["peak_mem_gib"] > 0 and r["options"]["reference"] == reference
    assert r["trainable_params"] == r["params"] and r["lora_rank"] == 0


def test_bench_lora_rank_reports_the_adapters_as_trainable(capsys):
    """--lora-rank=8: the base is frozen; trainable = r (in + out) per target per layer."""
    argv = ["bench", "--model", "tiny", "--steps", "1", "--warmup", "1", "--prompt-len", "16",
            "--completion-len", "15", "--bucket", "16", "--lora-rank", "8", "--reference", "precomputed"]
    assert cli_main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # tiny (D 64, 4 heads x 16, 2 kv heads, F 128): q, k, v, o, gate, up, down
    in_out = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)
    assert r["lora_rank"] == 8 and r["trainable_params"] == 2 * 8 * in_out
    assert r["params"] == 6000 * 64 + 2 * (64 * 16 * 4 + 2 * 64 * 16 * 2 + 4 * 16 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert np.isfinite(r["loss"]) and 0.3 < r["loss"] < 0.7


def test_bench_topology_aot_compiles_the_workload_for_a_tpu_slice(capsys):
    """--topology: the same workload compiled for TPU chips on this host; per-chip memory."""
    pytest.importorskip("libtpu", reason="libtpu (the tpu/test extra) is not installed")
    argv = ["bench", "--model", "tiny", "--topology", "v5e-4", "--prompt-len", "16",
            "--completion-len", "15", "--bucket", "16"]
    assert cli_main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["mode"] == "aot-compile" and r["chips"] == 4 and r["fits"] is True
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["padded_seq"] == 32
    mem = r["per_chip_gib"]
    # donated state: the outputs reuse the arguments' buffers
    assert mem["aliased"] == mem["arguments"] > 0
    assert mem["total"] == pytest.approx(mem["arguments"] + mem["outputs"] - mem["aliased"]
                                         + mem["temporaries"] + mem["generated_code"], abs=0.003)
