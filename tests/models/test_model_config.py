"""ModelConfig: HF config.json in and out, presets, errors."""

import json

import pytest
import transformers

from kto_jax.errors import UserError
from kto_jax.models.config import PRESETS, ModelConfig, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_hf_loads_in_transformers_and_reads_back_equal(name, tmp_path):
    config = PRESETS[name]()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert hf.model_type == config.model_type and hf.architectures == [config.architecture]
    text = hf.get_text_config()  # a multimodal config's language model (else hf itself)
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.head_dim) == (
        config.hidden_size, config.num_layers, config.num_kv_heads, config.head_dim)
    # transformers v5 rewrites rope fields as rope_parameters; both spellings read back the same.
    back = ModelConfig.from_hf(hf.to_dict())
    if config.outer_config:  # transformers writes its own defaults around a multimodal model's keys
        ours, theirs = json.loads(config.outer_config), json.loads(back.outer_config)
        assert {k: theirs[k] for k in ours if k != "vision_config"} == {
            k: v for k, v in ours.items() if k != "vision_config"}
        assert theirs["vision_config"].items() >= ours["vision_config"].items()
        back = back.replace(outer_config=config.outer_config)
    assert back == config
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_legacy_rope_scaling_spelling():
    hf = PRESETS["llama2_7b"]().to_hf()
    hf["rope_scaling"] = {"type": "linear", "factor": 2.0}
    config = ModelConfig.from_hf(hf)
    assert config.rope_type == "linear" and config.rope_scaling_dict["factor"] == 2.0


def test_overrides_and_hashability():
    hf = PRESETS["qwen3_0_6b"]().to_hf()
    hf["eos_token_id"] = [151645, 151643]
    config = ModelConfig.from_hf(hf, dtype="bfloat16", remat_policy="dots")
    assert config.eos_token_id == (151645, 151643) and config.dtype == "bfloat16"
    assert config.qk_norm and not config.attention_bias
    hash(config)


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["GemmaForCausalLM"]}, "GemmaForCausalLM.*Qwen3ForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn.*llama3"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_hf_configs_are_named(change, match):
    hf = {**PRESETS["llama3_8b"]().to_hf(), **change}
    with pytest.raises(UserError, match=match):
        ModelConfig.from_hf(hf)


def test_qwen3_attention_bias_is_rejected():
    hf = {**PRESETS["qwen3_0_6b"]().to_hf(), "attention_bias": True}
    with pytest.raises(UserError, match="attention_bias"):
        ModelConfig.from_hf(hf)


def test_switches_must_match_the_architecture():
    with pytest.raises(UserError, match="qk_norm"):
        ModelConfig(architecture="LlamaForCausalLM", qk_norm=True)
    with pytest.raises(UserError, match="attention_bias"):
        ModelConfig(architecture="Qwen2ForCausalLM")


def test_qwen_sliding_window_is_rejected():
    hf = {**PRESETS["qwen25_0_5b"]().to_hf(), "use_sliding_window": True, "sliding_window": 4096}
    with pytest.raises(UserError, match="use_sliding_window"):
        ModelConfig.from_hf(hf)


def test_unknown_preset():
    with pytest.raises(UserError, match="llama32_1b"):
        preset("llama4")
    assert preset("llama32_1b", dtype="bfloat16").tie_word_embeddings
