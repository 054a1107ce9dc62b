"""Online rounds survive every sample a policy can produce (a real CLI run, two rounds):
a policy that often emits end-of-sequence first (an empty completion, kept as its EOS
token), samples of special tokens only (empty once decoded), samples cut at
max_new_tokens, and a judge that sometimes gives NaN or None (left out and counted)."""

import json
import math
import os

import numpy as np
import pytest

from online_helpers import online_argv, online_env
from run_helpers import run_cli
from kto_jax.train.metrics import read_jsonl


def write_eos_first_model(tiny_model_dir: str, out_dir: str) -> str:
    """The tests' tiny Llama made to open with </s> about a quarter of the time: every
    layer's output projections are zero, so the last hidden state is the token's embedding,
    whose first coordinate alone is 1; lm_head reads that coordinate for </s>, <s> and <pad>
    only, with logits log 150 and log 100 against 0 for the other ~300 tokens: at every
    step P(</s>) is about 150 / 650 and P(<s> or <pad>) about 200 / 650."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        scale = math.sqrt(hidden)              # RMSNorm turns the one 1 into sqrt(hidden)
        model.lm_head.weight[tokenizer.eos_token_id, 0] = math.log(150.0) / scale
        for special in (tokenizer.bos_token_id, tokenizer.pad_token_id):
            model.lm_head.weight[special, 0] = math.log(100.0) / scale
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
def test_empty_cut_special_and_unjudged_samples_never_stop_a_run(
        tiny_model_dir, prompts_file, compile_cache, tmp_path):
    model = write_eos_first_model(tiny_model_dir, str(tmp_path / "eos-first"))
    workdir = str(tmp_path / "run")
    proc = run_cli(online_argv(workdir, model, prompts_file,
                               "--config.online.judge=unreliable_judge:score"),
                   online_env(compile_cache))
    samples = [s for r in (1, 2) for s in read_jsonl(
        os.path.join(workdir, "rounds", f"{r:04d}", "samples.jsonl"))]
    eos_first = [s for s in samples if s["finished"] and s["num_tokens"] == 0]
    special_only = [s for s in samples if s["completion"] == "" and s["num_tokens"] > 0]
    cut = [s for s in samples if not s["finished"]]
    unjudged = [s for s in samples if s.get("score") is None or not math.isfinite(s["score"])]
    assert eos_first and special_only and cut and unjudged, (len(eos_first), len(special_only),
                                                             len(cut), len(unjudged))
    examples = read_jsonl(os.path.join(workdir, "rounds", "0001", "examples.jsonl"))
    assert any(e["completion"] == "" for e in examples)          # kept: its EOS token
    rounds = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("kind") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert sum(r["judge/unscored"] for r in rounds) > 0
    assert all(np.isfinite(r["judge/pass_rate"]) for r in rounds)
    assert os.path.isdir(os.path.join(workdir, "hf"))
    assert "Traceback" not in proc.stderr
