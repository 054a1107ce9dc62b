"""A tiny multimodal Gemma 3 (Gemma3ForConditionalGeneration, Gemma's chat template, a
window of 4 shorter than every example) through `kto-jax train`, `export`, `sample`:
packed and padded runs agree, a SIGKILLed run resumes bit for bit, two processes train
like one, the export carries the vision tower through bit for bit and loads in
transformers, `sample` renders the system message into the first user turn.

CLI subprocesses on 4 CPU devices (slow: several runs); the model-level parity of the
Gemma families is tests/models/test_hf_io.py's.
"""

import json
import os
import sys

import numpy as np
import pytest

from run_helpers import (PACKING, assert_resume_is_bitwise, cli_env, run_cli, run_two_processes,
                         tensors, train_argv)
from kto_jax.train.metrics import TIMING_KEYS, read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(model dir, conversational feedback file) of the tiny Gemma chat model."""
    pytest.importorskip("torch")
    from tiny_models import write_gemma_feedback, write_gemma_model_dir
    root = tmp_path_factory.mktemp("gemma")
    model_dir = write_gemma_model_dir(str(root / "model"))
    data = str(root / "feedback.jsonl")
    write_gemma_feedback(data, 80, seed=1)
    return model_dir, data


@pytest.fixture(scope="module")
def gemma_run(gemma, compile_cache, tmp_path_factory) -> str:
    """One uninterrupted packed run (the comparison of the others)."""
    workdir = str(tmp_path_factory.mktemp("gemma_run"))
    run_cli(train_argv(workdir, *gemma, *PACKING), cli_env(compile_cache))
    return workdir


def assert_metrics_like(workdir: str, reference: str) -> None:
    """Every logged train and eval value equal within float32 rounding (run_helpers'
    tolerances), except rewards/accuracies while the margin is still within rounding of 0
    (the first steps of warmup), where another program may flip a reward's sign."""
    for log in ("metrics.jsonl", "eval_metrics.jsonl"):
        ours, theirs = (read_jsonl(os.path.join(w, log)) for w in (workdir, reference))
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] and ours
        for mine, ref in zip(ours, theirs):
            tied = abs(ref.get("rewards/margins") or 0.0) < 1e-4
            for key, value in ref.items():
                if key in TIMING_KEYS or value is None or (tied and key.endswith("accuracies")):
                    continue
                np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=2e-5,
                                           err_msg=f"{log} step {ref['step']} {key}")


def test_gemma_run_exports_the_same_architecture_with_the_vision_tower_untouched(gemma, gemma_run):
    transformers = pytest.importorskip("transformers")
    lines = read_jsonl(os.path.join(gemma_run, "metrics.jsonl"))
    assert lines[-1]["loss"] < lines[0]["loss"]
    hf = os.path.join(gemma_run, "hf")
    exported, original = tensors(hf), tensors(gemma[0])
    assert exported.keys() == original.keys()
    untrained = [k for k in original if "language_model" not in k]
    assert untrained and all(exported[k].tobytes() == original[k].tobytes() for k in untrained)
    assert any(not np.array_equal(exported[k], original[k]) for k in original if k not in untrained)
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in config
    assert not any(k.startswith("kto_jax") for k in config)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration" and not info["missing_keys"]


def test_gemma_padded_run_logs_the_packed_runs_metrics(gemma, gemma_run, compile_cache, tmp_path):
    workdir = str(tmp_path / "padded")
    run_cli(train_argv(workdir, *gemma), cli_env(compile_cache))
    assert_metrics_like(workdir, gemma_run)


def test_gemma_sigkill_then_resume_is_bitwise(gemma, gemma_run, compile_cache, tmp_path):
    workdir = str(tmp_path / "killed")
    assert_resume_is_bitwise(train_argv(workdir, *gemma, *PACKING), cli_env(compile_cache), workdir,
                             gemma_run)


def test_two_gemma_processes_match_one(gemma, gemma_run, compile_cache, tmp_path):
    workdir = str(tmp_path / "two")
    run_two_processes(train_argv(workdir, *gemma, *PACKING), compile_cache)
    assert_metrics_like(workdir, gemma_run)
    exported = tensors(os.path.join(workdir, "hf"))
    original = tensors(gemma[0])
    assert all(exported[k].tobytes() == original[k].tobytes() for k in original if "vision" in k)


def test_sample_renders_the_system_message_into_the_first_user_turn(gemma_run, compile_cache, tmp_path):
    from kto_jax.eval import sampling
    from kto_jax.models import load_tokenizer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat ?"}]
    rendered = sampling.render_prompt(load_tokenizer(os.path.join(gemma_run, "hf")), messages)
    assert rendered == "<bos><start_of_turn>user\nbe brief\n\nthe cat ?<end_of_turn>\n<start_of_turn>model\n"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": messages}) + "\n" + json.dumps({"prompt": "the dog ?"}) + "\n")
    out = tmp_path / "out.jsonl"
    run_cli([sys.executable, "-m", "kto_jax.cli", "sample", "--model", gemma_run, "--prompts", str(prompts),
             "--out", str(out), "--max_new_tokens", "12"], cli_env(compile_cache))
    rows = [json.loads(line) for line in open(out)]
    assert [r["prompt"] for r in rows] == [messages, "the dog ?"]
    assert all(0 < r["num_tokens"] <= 12 for r in rows)
