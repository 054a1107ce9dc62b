"""LoRA export/import against the real `peft` package: merged HF export, PEFT adapters, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from hf_tiny_models import hf_logits, make_hf_model, padded_batch
from safetensors.numpy import load_file, save_file

from kto_jax.errors import UserError
from kto_jax.models import from_pretrained, positions_from_mask
from kto_jax.models import lora, lora_io

TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF model dir, our model, its config) of a tiny random Qwen2 (biases on, GQA)."""
    path = str(tmp_path_factory.mktemp("base"))
    make_hf_model("qwen2").save_pretrained(path)
    model, config = from_pretrained(path)
    return path, model, config


@pytest.fixture(scope="module")
def batch():
    ids, mask = padded_batch()
    return ids, mask, np.asarray(positions_from_mask(mask))


def _hf_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _trained_adapters(config):
    adapters = lora.LoraAdapters(config, lora.LoraConfig(rank=4, alpha=12.0, target_modules=TARGETS),
                                 rngs=nnx.Rngs(2))
    keys = iter(jax.random.split(jax.random.key(4), len(TARGETS)))
    for t in TARGETS:
        var = getattr(adapters, t + lora.B_SUFFIX)
        var.set_value(0.1 * jax.random.normal(next(keys), var[...].shape))
    return adapters


def test_ours_merged_export_and_peft_agree(base, batch, tmp_path):
    path, model, config = base
    ids, mask, pos = batch
    adapters = _trained_adapters(config)
    ours = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
    lora_io.save_merged(model, adapters, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    lora_io.save_peft(adapters, config, str(tmp_path / "peft"), base_model_name_or_path=path)
    peft_model = peft.PeftModel.from_pretrained(_hf_base(path), str(tmp_path / "peft")).eval()
    real = mask.astype(bool)
    base_logits = hf_logits(_hf_base(path), ids, mask, pos)[real]
    for other in (hf_logits(merged.eval(), ids, mask, pos), hf_logits(peft_model, ids, mask, pos)):
        np.testing.assert_allclose(ours[real], other[real], atol=1e-4, rtol=0)
    assert np.abs(ours[real] - base_logits).max() > 1e-2  # the adapters matter


@pytest.mark.parametrize("name", ["gemma3_multimodal"])
def test_gemma_all_seven_projections_merged_and_peft_agree(name, batch, tmp_path):
    """LoRA on q/k/v/o/gate/up/down of the multimodal Gemma 3's language model: our logits =
    the merged export's = peft's on the original HF model, and peft adapts the language
    model only (its vision tower has q/k/v_proj too)."""
    path = str(tmp_path / "base")
    make_hf_model(name).save_pretrained(path)
    model, config = from_pretrained(path)
    ids, mask, pos = batch
    adapters = lora.LoraAdapters(config, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(2))
    assert adapters.targets == lora.TARGET_MODULES  # all seven
    for key, t in zip(jax.random.split(jax.random.key(5), 7), adapters.targets):
        var = getattr(adapters, t + lora.B_SUFFIX)
        var.set_value(0.1 * jax.random.normal(key, var[...].shape))
    ours = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
    lora_io.save_merged(model, adapters, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    lora_io.save_peft(adapters, config, str(tmp_path / "peft"), base_model_name_or_path=path)
    peft_model = peft.PeftModel.from_pretrained(_hf_base(path), str(tmp_path / "peft")).eval()
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 7 * config.num_layers and not [n for n in adapted if "vision" in n]
    real = mask.astype(bool)
    for other in (hf_logits(merged.eval(), ids, mask, pos), hf_logits(peft_model, ids, mask, pos)):
        np.testing.assert_allclose(ours[real], other[real], atol=1e-4, rtol=0)
    assert np.abs(ours[real] - hf_logits(_hf_base(path), ids, mask, pos)[real]).max() > 1e-2
    back = lora_io.read_peft(str(tmp_path / "peft"), config, lora.LoraConfig())
    np.testing.assert_array_equal(np.asarray(lora.attach(model, back)(ids, pos, mask)), ours)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_attention_adapters_merged_and_peft_agree(name, batch, tmp_path):
    """LoRA on a mixture of experts' attention (q/k/v/o; its experts stay frozen): our logits =
    the merged export's = peft's on the original HF model; the adapter reads back."""
    path = str(tmp_path / "base")
    make_hf_model(name).save_pretrained(path)
    model, config = from_pretrained(path)
    ids, mask, pos = batch
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    adapters = lora.LoraAdapters(config, lora.LoraConfig(rank=4, alpha=8.0, target_modules=targets),
                                 rngs=nnx.Rngs(2))
    for key, t in zip(jax.random.split(jax.random.key(6), 4), targets):
        var = getattr(adapters, t + lora.B_SUFFIX)
        var.set_value(0.1 * jax.random.normal(key, var[...].shape))
    ours = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
    lora_io.save_merged(model, adapters, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    lora_io.save_peft(adapters, config, str(tmp_path / "peft"), base_model_name_or_path=path)
    peft_model = peft.PeftModel.from_pretrained(_hf_base(path), str(tmp_path / "peft")).eval()
    assert len([n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]) == 4 * config.num_layers
    real = mask.astype(bool)
    for other in (hf_logits(merged.eval(), ids, mask, pos), hf_logits(peft_model, ids, mask, pos)):
        np.testing.assert_allclose(ours[real], other[real], atol=1e-4, rtol=0)
    assert np.abs(ours[real] - hf_logits(_hf_base(path), ids, mask, pos)[real]).max() > 1e-2
    back = lora_io.read_peft(str(tmp_path / "peft"), config, lora.LoraConfig())
    np.testing.assert_array_equal(np.asarray(lora.attach(model, back)(ids, pos, mask)), ours)


EXPERT_TARGETS = ("q_proj", "v_proj", "expert_gate_up_proj", "expert_down_proj")


def _expert_adapters(config, targets=EXPERT_TARGETS, seed=7):
    adapters = lora.LoraAdapters(config, lora.LoraConfig(rank=3, alpha=6.0, target_modules=targets),
                                 rngs=nnx.Rngs(2))
    for key, t in zip(jax.random.split(jax.random.key(seed), len(targets)), targets):
        var = getattr(adapters, t + lora.B_SUFFIX)
        var.set_value(0.1 * jax.random.normal(key, var[...].shape))
    return adapters


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_expert_adapters_merged_and_peft_agree(name, batch, tmp_path):
    """LoRA on every expert's gate/up/down (and q, v): our logits = the merged export's =
    the real peft's (target_parameters on transformers' fused expert weights) on the
    original HF model, float32 within 1e-4; the merged expert weights are W + (alpha / r)
    A_e B_e by hand; the PEFT adapter reads back bit for bit."""
    path = str(tmp_path / "base")
    make_hf_model(name).save_pretrained(path)
    model, config = from_pretrained(path)
    ids, mask, pos = batch
    adapters = _expert_adapters(config)
    lora.validate(lora.LoraConfig(rank=3, target_modules=EXPERT_TARGETS), config)
    ours = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
    lora_io.save_merged(model, adapters, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    lora_io.save_peft(adapters, config, str(tmp_path / "peft"), base_model_name_or_path=path)
    peft_model = peft.PeftModel.from_pretrained(_hf_base(path), str(tmp_path / "peft")).eval()
    wrapped = [n for n, m in peft_model.named_modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrapped) == 2 * config.num_layers  # gate_up and down of every layer's experts
    real = mask.astype(bool)
    base = _hf_base(path)
    for other in (hf_logits(merged.eval(), ids, mask, pos), hf_logits(peft_model, ids, mask, pos)):
        np.testing.assert_allclose(ours[real], other[real], atol=1e-4, rtol=0)
    assert np.abs(ours[real] - hf_logits(base, ids, mask, pos)[real]).max() > 1e-2
    a, b = (np.asarray(x, np.float64) for x in adapters.factors("expert_gate_up_proj"))
    d, e = (np.asarray(x, np.float64) for x in adapters.factors("expert_down_proj"))
    for i in range(config.num_layers):  # HF layout: gate_up [E, 2F, D], down [E, D, F]
        want_gate_up = base.model.layers[i].mlp.experts.gate_up_proj.detach().double().numpy() + 2.0 * np.einsum(
            "edr,erf->efd", a[i], b[i])
        want_down = base.model.layers[i].mlp.experts.down_proj.detach().double().numpy() + 2.0 * np.einsum(
            "efr,erd->edf", d[i], e[i])
        got = merged.model.layers[i].mlp.experts
        np.testing.assert_allclose(got.gate_up_proj.detach().numpy(), want_gate_up, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(got.down_proj.detach().numpy(), want_down, atol=1e-6, rtol=1e-6)
    back = lora_io.read_peft(str(tmp_path / "peft"), config, lora.LoraConfig())
    assert back.targets == EXPERT_TARGETS
    np.testing.assert_array_equal(np.asarray(lora.attach(model, back)(ids, pos, mask)), ours)


def test_dense_and_sparse_layers_adapters_merged_and_peft_agree(batch, tmp_path):
    """Qwen3-MoE with a dense layer 0 (mlp_only_layers=[0]): LoRA on q, the sparse layers'
    experts and (not for peft) the dense layer's gate_proj, each target's factors stacked over
    its own layers: our logits = the merged export's = the real peft's (q and the experts:
    peft reads a gate_proj target of a Qwen3-MoE as the experts' fused gate_up); our PEFT
    files read back bit for bit."""
    path = str(tmp_path / "base")
    make_hf_model("qwen3_moe_dense0").save_pretrained(path)
    model, config = from_pretrained(path)
    assert config.dense_mlp_layers == (0,)
    ids, mask, pos = batch
    real = mask.astype(bool)
    for targets in (("q_proj", "expert_gate_up_proj", "expert_down_proj"),
                    ("q_proj", "gate_proj", "expert_gate_up_proj", "expert_down_proj")):
        out = tmp_path / str(len(targets))
        adapters = _expert_adapters(config, targets)
        assert adapters.factors("expert_down_proj")[0].shape[0] == 1
        ours = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
        lora_io.save_merged(model, adapters, str(out / "merged"))
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
        np.testing.assert_allclose(ours[real], hf_logits(merged.eval(), ids, mask, pos)[real], atol=1e-4, rtol=0)
        lora_io.save_peft(adapters, config, str(out / "peft"), base_model_name_or_path=path)
        back = lora_io.read_peft(str(out / "peft"), config, lora.LoraConfig())
        np.testing.assert_array_equal(np.asarray(lora.attach(model, back)(ids, pos, mask)), ours)
        if "gate_proj" not in targets:
            peft_model = peft.PeftModel.from_pretrained(_hf_base(path), str(out / "peft")).eval()
            np.testing.assert_allclose(ours[real], hf_logits(peft_model, ids, mask, pos)[real], atol=1e-4, rtol=0)
    assert adapters.factors("gate_proj")[0].shape[0] == 1
    b = getattr(adapters, "gate_proj" + lora.B_SUFFIX)
    b.set_value(jnp.zeros_like(b[...]))
    without = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
    assert np.abs(ours[real] - without[real]).max() > 1e-3  # the dense layer's adapter acts


def test_peft_made_expert_adapter_imports_to_the_same_logits(batch, tmp_path):
    """An adapter peft itself creates on the experts' down_proj alone (its own nesting and
    factor layout) reads back to peft's logits."""
    path = str(tmp_path / "base")
    make_hf_model("qwen3_moe").save_pretrained(path)
    model, config = from_pretrained(path)
    ids, mask, pos = batch
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_hf_base(path), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["k_proj"], target_parameters=["mlp.experts.down_proj"]))
    for n, prm in peft_model.named_parameters():
        if "lora_B" in n:
            prm.data.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    back = lora_io.read_peft(str(tmp_path / "peft"), config, lora.LoraConfig())
    assert back.targets == ("k_proj", "expert_down_proj")
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(lora.attach(model, back)(ids, pos, mask))[real],
                               hf_logits(peft_model.eval(), ids, mask, pos)[real], atol=1e-4, rtol=0)


def test_expert_targets_are_checked():
    from kto_jax.models.config import ModelConfig
    moe_config = ModelConfig.from_hf(make_hf_model("mixtral").config.to_dict())
    with pytest.raises(UserError, match="dropout=0.1 with expert adapters.*--config.lora.dropout=0"):
        lora.validate(lora.LoraConfig(rank=4, dropout=0.1, target_modules=("expert_down_proj",)), moe_config)
    with pytest.raises(UserError, match="expert_gate_up_proj not in LlamaForCausalLM.*for mixtures of experts"):
        lora.validate(lora.LoraConfig(rank=4, target_modules=("q_proj", "expert_gate_up_proj")),
                      ModelConfig.from_hf(make_hf_model("llama2").config.to_dict()))


def test_moe_refuses_dense_mlp_targets_naming_the_attention_ones():
    config = make_hf_model("mixtral").config.to_dict()
    from kto_jax.models.config import ModelConfig
    with pytest.raises(UserError, match="gate_proj, up_proj, down_proj not in MixtralForCausalLM.*"
                       "expert_gate_up_proj expert_down_proj.*q_proj k_proj v_proj o_proj"):
        lora.validate(lora.LoraConfig(rank=4), ModelConfig.from_hf(config))


def test_adapter_made_by_peft_imports_to_the_same_logits(base, batch, tmp_path):
    path, model, config = base
    ids, mask, pos = batch
    hf = _hf_base(path)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "up_proj", "o_proj"],
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "sft"))
    want = hf_logits(pm.eval(), ids, mask, pos)
    adapters = lora_io.read_peft(str(tmp_path / "sft"), config, lora.LoraConfig())
    assert adapters.targets == ("k_proj", "o_proj", "up_proj") and adapters.scale == pytest.approx(5 / 3)
    got = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    # ... and writes back the same tensors peft wrote.
    lora_io.save_peft(adapters, config, str(tmp_path / "again"))
    before, after = (load_file(str(tmp_path / d / lora_io.ADAPTER_WEIGHTS)) for d in ("sft", "again"))
    assert set(before) == set(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def _write_adapter(directory, adapters, config, edit_config=None, edit_tensors=None):
    lora_io.save_peft(adapters, config, str(directory))
    if edit_config:
        p = os.path.join(directory, lora_io.ADAPTER_CONFIG)
        cfg = json.load(open(p))
        edit_config(cfg)
        json.dump(cfg, open(p, "w"))
    if edit_tensors:
        p = os.path.join(directory, lora_io.ADAPTER_WEIGHTS)
        tensors = load_file(p)
        edit_tensors(tensors)
        save_file(tensors, p)
    return str(directory)


@pytest.mark.parametrize("case, needle", [
    ("no_dir", "no adapter_config.json"),
    ("rank", r"config.lora.rank=8 but the adapter .* has 4"),
    ("dora", "use_dora=True"),
    ("layers", r"does not match the base model .*2 layers.*1 unexpected"),
    ("shape", r"has shape \(4, 32\) but the base model needs \(4, 64\)"),
    ("module", "init_from=.*the adapter targets lm_head"),
    ("parameter", "init_from=.*the adapter targets mlp.experts.gate_proj.*mlp.experts.gate_up_proj"),
])
def test_bad_adapter_directories_are_named(base, tmp_path, case, needle):
    _, _, config = base
    adapters = _trained_adapters(config)
    key = lora_io.peft_key(0, "q_proj", "A")
    edits = {
        "no_dir": {},
        "rank": {},
        "dora": dict(edit_config=lambda c: c.update(use_dora=True)),
        "layers": dict(edit_tensors=lambda t: t.update({lora_io.peft_key(2, "q_proj", "A"): t[key]})),
        "shape": dict(edit_tensors=lambda t: t.update({key: t[key][:, :32].copy()})),
        "module": dict(edit_config=lambda c: c.update(target_modules=c["target_modules"] + ["lm_head"])),
        "parameter": dict(edit_config=lambda c: c.update(target_parameters=["mlp.experts.gate_proj"])),
    }
    directory = tmp_path / "adapter"
    if case != "no_dir":
        _write_adapter(directory, adapters, config, **edits[case])
    wanted = lora.LoraConfig(rank=8) if case == "rank" else lora.LoraConfig()
    with pytest.raises(UserError, match=needle):
        lora_io.read_peft(str(directory), config, wanted)
