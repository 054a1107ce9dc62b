"""`kto-jax online` under LoRA (config.lora): the sampler runs base + adapters without a
merged copy, the reference is the base ("initial") or base + the adapters frozen as each
round starts ("refresh"), a SIGKILLed run resumes to the uninterrupted one, and the
workdir exports merged and as a PEFT adapter."""

import glob
import json
import os
import sys

import numpy as np
import pytest

from online_helpers import online_argv, online_env
from run_helpers import run_cli
from test_online_run import _kill_when, _round_files, _rows, _weights

from kto_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier

LORA = ("--config.lora.rank=4", "--config.lora.alpha=8.0")
STEPS_PER_ROUND = 2


@pytest.fixture(scope="module")
def lora_refresh_run(tmp_path_factory, tiny_model_dir, prompts_file, compile_cache) -> str:
    workdir = str(tmp_path_factory.mktemp("online_lora"))
    run_cli(online_argv(workdir, tiny_model_dir, prompts_file, *LORA,
                        "--config.online.reference=refresh"), online_env(compile_cache))
    return workdir


def test_sampling_a_lora_view_equals_sampling_the_merged_model(tiny_model_dir):
    """The sampler on (LoraGraph, LoraView(base, adapters)) with adapters.model_of gives the
    tokens of the merged weights W + (alpha / r) A B: the adapters really are sampled."""
    import jax
    from flax import nnx
    from kto_jax.eval.sampling import Sampler, SamplingSettings
    from kto_jax.models import from_pretrained, load_tokenizer
    from kto_jax.models import lora as lora_lib
    from kto_jax.step import adapters as adapters_lib
    from kto_jax.step.state import split_lora

    model, _ = from_pretrained(tiny_model_dir, param_dtype="float32", dtype="float32")
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
    adapters = lora_lib.init_adapters(model.config, lora)
    for target in adapters.targets:  # B != 0, large enough to change greedy tokens
        b = getattr(adapters, target + lora_lib.B_SUFFIX)
        b.set_value(jax.random.normal(jax.random.key(len(target)), b[...].shape) * 0.5)
    merged = lora_lib.merge(model, adapters)
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = ["the cat sat ?", "a dog ran on the mat ?", "why ?"]
    greedy = SamplingSettings(max_new_tokens=8, temperature=0.0)

    base_tokens = [g.token_ids for g in Sampler(model, tokenizer).generate(prompts, greedy)]
    merged_tokens = [g.token_ids for g in Sampler(merged, tokenizer).generate(prompts, greedy)]
    graphdef, view = split_lora(model, adapters, lora)
    sampler = Sampler(model, tokenizer)
    sampler.set_params(view, graphdef, adapters_lib.model_of)
    lora_tokens = [g.token_ids for g in sampler.generate(prompts, greedy)]
    assert lora_tokens == merged_tokens
    assert lora_tokens != base_tokens          # the adapters change what is sampled
    assert isinstance(sampler.params, adapters_lib.LoraView)
    assert not any(isinstance(v, nnx.Variable) for v in jax.tree.leaves(sampler.params))


def test_lora_refresh_rounds_checkpoint_adapters_and_export(lora_refresh_run, tiny_model_dir,
                                                            compile_cache, tmp_path):
    rows = _rows(lora_refresh_run)
    rounds = [r for r in rows if r["kind"] == "round"]
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["kl_ref"] == 0.0                 # B = 0: the policy is the base
    for first in (1, 1 + STEPS_PER_ROUND):            # refresh: pi_ref == pi as a round starts
        assert train[first]["kl"] == 0.0
        assert train[first]["rewards/desirable"] == train[first]["rewards/undesirable"] == 0.0
    assert train[2 * STEPS_PER_ROUND]["kl"] > 0.0 and rounds[-1]["kl_ref"] > 0.0
    # the checkpoint holds the adapters and their moments only: no base, no reference copy
    meta = os.path.join(lora_refresh_run, "checkpoints", str(2 * STEPS_PER_ROUND), "state",
                        "_METADATA")
    with open(meta, encoding="utf-8") as f:
        keys = list(json.load(f)["tree_metadata"])
    variables = [k for k in keys if k.endswith("'value')")]
    assert variables and all("_lora_" in k for k in variables)
    assert not any(k.startswith(("('base_params', ", "('reference_params', ")) for k in keys)

    # WORKDIR/hf is the merged policy; `kto-jax export --format=peft` of the same workdir,
    # loaded by peft onto the original model, gives its logits
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    from safetensors.numpy import load_file
    merged = _weights(lora_refresh_run)
    base = {k: v for path in glob.glob(os.path.join(tiny_model_dir, "*.safetensors"))
            for k, v in load_file(path).items()}
    assert merged.keys() == base.keys()
    assert any(not np.array_equal(merged[k], base[k]) for k in base if "q_proj" in k)
    assert all(np.array_equal(merged[k], base[k]) for k in base if "norm" in k or "embed" in k)
    peft_dir = str(tmp_path / "peft")
    run_cli([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", lora_refresh_run,
             "--out", peft_dir, "--format=peft"], online_env(compile_cache))

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        ours = load(os.path.join(lora_refresh_run, "hf"))(ids).logits.numpy()
        via_peft = peft.PeftModel.from_pretrained(load(tiny_model_dir), peft_dir).eval()(ids)
        plain = load(tiny_model_dir)(ids).logits.numpy()
    np.testing.assert_allclose(via_peft.logits.numpy(), ours, atol=1e-4)
    assert np.abs(plain - ours).max() > 1e-4


def test_lora_sigkill_then_resume_reproduces_the_uninterrupted_run(
        lora_refresh_run, tmp_path, tiny_model_dir, prompts_file, compile_cache):
    workdir = str(tmp_path / "killed")
    argv = online_argv(workdir, tiny_model_dir, prompts_file, *LORA,
                       "--config.online.reference=refresh")
    env = online_env(compile_cache)
    # after round 1's checkpoint, as round 2 trains on base + the refreshed adapter copy
    _kill_when(argv, env, lambda: os.path.isdir(os.path.join(workdir, "checkpoints",
                                                             str(STEPS_PER_ROUND))) and
               os.path.exists(os.path.join(workdir, "rounds", "0002", "examples.jsonl")))
    assert not os.path.exists(os.path.join(workdir, "hf"))
    proc = run_cli(argv, env)
    assert "resuming after round 1" in proc.stderr
    assert "the reference is the base + a frozen copy of the adapters" in proc.stderr
    assert _round_files(workdir) == _round_files(lora_refresh_run)
    assert _rows(workdir) == _rows(lora_refresh_run)
    ours, theirs = _weights(workdir), _weights(lora_refresh_run)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_lora_initial_reference_is_the_base(tmp_path, tiny_model_dir, prompts_file,
                                            compile_cache):
    """online.reference="initial" under LoRA: pi_ref is the base with the adapters off for
    the whole run, so round 2's first step already sees the drift of round 1."""
    workdir = str(tmp_path / "initial")
    proc = run_cli(online_argv(workdir, tiny_model_dir, prompts_file, *LORA),
                   online_env(compile_cache))
    assert "the reference is the base with the adapters off" in proc.stderr
    train = {r["step"]: r for r in _rows(workdir) if r["kind"] == "train"}
    assert train[1]["kl"] == 0.0 and train[1 + STEPS_PER_ROUND]["kl"] > 0.0
    assert train[1 + STEPS_PER_ROUND]["rewards/desirable"] != 0.0
    assert read_jsonl(os.path.join(workdir, "rounds", "0001", "samples.jsonl"))
    assert glob.glob(os.path.join(workdir, "hf", "*.safetensors"))
