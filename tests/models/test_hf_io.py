"""HF import/export: logit parity with transformers, exact export round trip, sharded load, errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_tiny_models import HF_CASES, base_config, hf_logits, make_hf_model, padded_batch
from safetensors.numpy import load_file, save_file
from tiny_models import word_tokenizer

from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models import from_pretrained, load_tokenizer, positions_from_mask, save_pretrained



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, its save_pretrained directory); qwen2 is saved sharded."""
    out = {}
    for name in HF_CASES:
        model = make_hf_model(name)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path, max_shard_size="100KB" if name == "qwen2" else "5GB")
        out[name] = (model, path)
    return out


@pytest.fixture(scope="module")
def batch():
    ids, mask = padded_batch()
    return ids, mask, np.asarray(positions_from_mask(mask))


@pytest.mark.parametrize("name", list(HF_CASES))
def test_float32_logits_match_transformers(checkpoints, batch, name):
    hf_model, path = checkpoints[name]
    ids, mask, pos = batch
    model, config = from_pretrained(path)
    assert config.architecture == hf_model.config.architectures[0]
    got = np.asarray(model(ids, pos, mask))
    want = hf_logits(hf_model, ids, mask, pos)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_sharded_index_checkpoint_was_exercised(checkpoints):
    path = checkpoints["qwen2"][1]
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("name", list(HF_CASES))
def test_export_reloads_in_transformers_with_identical_tensors(checkpoints, tmp_path, name):
    hf_model, path = checkpoints[name]
    model, _ = from_pretrained(path)
    save_pretrained(model, str(tmp_path), max_shard_bytes=60_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(reloaded) is type(hf_model)
    want, got = hf_model.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_mesh_logits_equal_one_device_logits(checkpoints, batch):
    ids, mask, pos = batch
    path = checkpoints["llama2"][1]
    one, _ = from_pretrained(path)
    mesh_cfg = base_config().mesh
    mesh_cfg.fsdp, mesh_cfg.tensor = 4, 2
    mesh = shd.make_mesh(mesh_cfg)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    sharded, _ = from_pretrained(path, mesh=mesh, rules=mesh_cfg.rules)
    q = sharded.layers.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    with jax.set_mesh(mesh):
        got = np.asarray(nnx.jit(lambda m, a, b, c: m(a, b, c))(sharded, ids, pos, mask))
    np.testing.assert_allclose(got, np.asarray(one(ids, pos, mask)), atol=1e-5)


def test_bf16_params_load_as_rounded_fp32(checkpoints):
    path = checkpoints["llama2"][1]
    model, config = from_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
    assert config.param_dtype == "bfloat16" and model.embed_tokens[...].dtype == jax.numpy.bfloat16
    want = checkpoints["llama2"][0].model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...], np.float32), want)


def test_tokenizer_is_saved_alongside_and_reloads(checkpoints, tmp_path):
    model, _ = from_pretrained(checkpoints["llama2"][1])
    tokenizer = word_tokenizer()
    save_pretrained(model, str(tmp_path), tokenizer=tokenizer)
    reloaded = load_tokenizer(str(tmp_path))
    text = "w5 w17 w250 unknown"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"] == [9, 21, 254, 3]
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 2)


# ---- the multimodal checkpoint: its language model trained, the rest carried through ----

# transformers 5 saves a Gemma3ForConditionalGeneration in the hub checkpoints' spelling
# (language_model.model.*, vision_tower.*); its own module names are the newer one.
SPELLINGS = (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
             ("multi_modal_projector.", "model.multi_modal_projector."))


def _respelled_copy(path, tmp_path):
    """The tiny multimodal checkpoint with every tensor name in the other spelling, its vision
    tower stored in bfloat16 (a dtype the language model's export does not use)."""
    import ml_dtypes
    dst = tmp_path / "respelled"
    dst.mkdir()
    shutil.copy(os.path.join(path, "config.json"), dst / "config.json")
    tensors = {}
    for name, value in load_file(os.path.join(path, "model.safetensors")).items():
        new = next((b + name[len(a):] for a, b in SPELLINGS + tuple((b, a) for a, b in SPELLINGS)
                    if name.startswith(a)), name)
        tensors[new] = value.astype(ml_dtypes.bfloat16) if "vision_tower" in name else value
    assert not set(tensors) & set(load_file(os.path.join(path, "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst, tensors


def test_multimodal_names_in_either_spelling_load_and_export_in_their_own(checkpoints, batch, tmp_path):
    hf_model, path = checkpoints["gemma3_multimodal"]
    legacy, stored = _respelled_copy(path, tmp_path)
    ids, mask, pos = batch
    model, config = from_pretrained(str(legacy))
    assert config.untrained_from == str(legacy) and os.path.isabs(config.untrained_from)
    np.testing.assert_array_equal(model(ids, pos, mask), from_pretrained(path)[0](ids, pos, mask))
    out = tmp_path / "export"
    save_pretrained(model, str(out), max_shard_bytes=60_000)
    index = json.load(open(out / "model.safetensors.index.json"))["weight_map"]
    assert set(index) == set(stored)  # every tensor, in the source's spelling
    for name, want in stored.items():
        got = load_file(str(out / index[name]))[name]
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
    written = json.load(open(out / "config.json"))
    assert written["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert written["vision_config"]["hidden_size"] == 32 and "kto_jax_untrained_tensors_from" not in written
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want, got = hf_model.state_dict(), reloaded.state_dict()
    for key in want:  # the language model exactly; the vision tower as stored (bfloat16)
        expected = want[key].to(torch.bfloat16).float() if "vision_tower" in key else want[key]
        assert torch.equal(got[key], expected), key


def test_multimodal_export_names_a_missing_source(checkpoints, tmp_path):
    d = _copy(checkpoints["gemma3_multimodal"][1], tmp_path)
    model, config = from_pretrained(str(d))
    assert config.to_hf()["kto_jax_untrained_tensors_from"] == str(d)  # a run's WORKDIR/model keeps it
    shutil.rmtree(d)
    with pytest.raises(UserError, match="untrained tensors.*no longer exists"):
        save_pretrained(model, str(tmp_path / "out"))
    model.config = config.replace(untrained_from=None)
    with pytest.raises(UserError, match="names none"):
        save_pretrained(model, str(tmp_path / "out"))


# ---- errors ----

def _copy(path, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _edit_tensors(directory, edit):
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(directory, **changes):
    cfg = json.load(open(directory / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(directory / "config.json", "w"))


def test_unsupported_architecture_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"][1], tmp_path)
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UserError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        from_pretrained(str(d))


def test_unsupported_rope_type_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"][1], tmp_path)
    _edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(UserError, match="'yarn'.*llama3"):
        from_pretrained(str(d))


def test_missing_tensor_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"][1], tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(str(d))


def test_extra_tensor_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"][1], tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(UserError, match=r"unexpected 1 tensor.*model\.layers\.2\.mlp\.up_proj"):
        from_pretrained(str(d))


def test_shape_mismatch_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"][1], tmp_path)
    _edit_config(d, intermediate_size=96)
    with pytest.raises(UserError, match=r"gate_proj\.weight.*\(128, 64\).*\(96, 64\)"):
        from_pretrained(str(d))


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        from_pretrained(str(tmp_path))
    _edit = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
             "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    json.dump(_edit, open(tmp_path / "config.json", "w"))
    with pytest.raises(UserError, match="model.safetensors"):
        from_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="tokenizer"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "qwen3_moe_dense0", "qwen3_moe_step2"])
def test_router_aux_loss_matches_transformers(checkpoints, batch, name):
    """The load-balancing loss of our router statistics = transformers' load_balancing_loss_func
    over its router logits (output_router_logits), padding left out by the attention mask."""
    from kto_jax.models.moe import load_balancing_loss
    hf_model, path = checkpoints[name]
    ids, mask, pos = batch
    model, config = from_pretrained(path)
    assert config.router_aux_loss_coef == hf_model.config.router_aux_loss_coef == 0.001
    _, stats = model.hidden_states(ids, pos, mask, router_weight=mask)
    got = float(load_balancing_loss(stats, mask.sum(), config.num_experts))
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                       position_ids=torch.from_numpy(np.array(pos)).long(), output_router_logits=True)
    np.testing.assert_allclose(got, float(out.aux_loss), rtol=1e-6)


def test_router_aux_loss_coef_is_the_checkpoints_unless_configured(checkpoints):
    """config.model.router_aux_loss_coef: -1 (default) keeps config.json's, 0 turns the loss off;
    on a dense model anything but 0 is refused by name."""
    from kto_jax.train.settings import ModelSettings
    mixtral = checkpoints["mixtral"][1]
    assert from_pretrained(mixtral, **ModelSettings().load_options())[1].router_aux_loss_coef == 0.001
    assert from_pretrained(mixtral, **ModelSettings(router_aux_loss_coef=0.0).load_options())[1] \
        .router_aux_loss_coef == 0.0
    with pytest.raises(UserError, match="router_aux_loss_coef=0.02 does not match LlamaForCausalLM"):
        from_pretrained(checkpoints["llama2"][1], **ModelSettings(router_aux_loss_coef=0.02).load_options())
