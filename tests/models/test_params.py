"""The HF <-> kto-jax param table covers the model one-to-one and its transforms invert."""

import numpy as np
import pytest
from flax import nnx
from hf_tiny_models import HF_CASES, hf_config

from kto_jax.models import params as table
from kto_jax.models.config import PRESETS, ModelConfig
from kto_jax.models.transformer import abstract_model

# One config per tiny HF case (tests/models/hf_tiny_models.py): every family's table.
CONFIGS = {name: ModelConfig.from_hf(hf_config(name).to_dict()) for name in HF_CASES}


def _flat_params(config):
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param))}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_table_covers_the_abstract_state_one_to_one(name):
    config = CONFIGS[name]
    rows = table.param_table(config)
    flat = _flat_params(config)
    paths = [row.path for row in rows]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(flat)
    hf_names = [n for row in rows
                for n in row.hf_names(config.num_layers, config.num_experts, config.stack_layers(row.path[-1]))]
    assert len(hf_names) == len(set(hf_names))
    for row in rows:  # stacked rows are exactly the params with a leading 'layers' axis
        assert row.stacked == (row.path[0] == "layers")
        if row.stacked:  # of size L; a mixture of experts' dense / sparse MLP: its layers
            layers = config.stack_layers(row.path[-1])
            assert flat[row.path].shape[0] == len(layers)
            assert len(layers) == config.num_layers or (config.dense_mlp_layers and row.path[-1] in (
                "gate_proj", "up_proj", "down_proj", "router", "expert_gate_proj", "expert_up_proj",
                "expert_down_proj"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transforms_round_trip_and_match_hf_shapes(name):
    config = CONFIGS[name]
    flat = _flat_params(config)
    rng = np.random.default_rng(0)
    for row in table.param_table(config):
        shape = flat[row.path].shape[1:] if row.stacked else flat[row.path].shape
        hf = rng.normal(size=table.hf_shape(row.transform, shape)).astype(np.float32)
        ours = table.to_ours(row.transform, hf, shape)
        assert ours.shape == shape
        np.testing.assert_array_equal(table.to_hf(row.transform, ours), hf)


def test_table_row_sets_follow_the_features():
    assert {r.path[-1] for r in table.param_table(CONFIGS["qwen2"])} >= {"q_bias", "k_bias", "v_bias"}
    assert {r.path[-1] for r in table.param_table(CONFIGS["qwen3"])} >= {"q_norm", "k_norm"}
    assert "lm_head" not in {r.path[-1] for r in table.param_table(CONFIGS["qwen3"])}
    assert "lm_head" in {r.path[-1] for r in table.param_table(CONFIGS["llama2"])}


def test_heads_layouts_by_hand():
    # HF q_proj [N*hd, D]: row n*hd + h is head n, dim h; ours [D, N, hd].
    n, hd, d = 3, 2, 4
    hf = np.arange(n * hd * d, dtype=np.float32).reshape(n * hd, d)
    ours = table.to_ours(table.HEADS_IN, hf, (d, n, hd))
    assert ours[1, 2, 0] == hf[2 * hd + 0, 1]
    # HF o_proj [D, H*hd]: column n*hd + h; ours [H, hd, D].
    hf_o = np.arange(d * n * hd, dtype=np.float32).reshape(d, n * hd)
    ours_o = table.to_ours(table.HEADS_OUT, hf_o, (n, hd, d))
    assert ours_o[2, 1, 3] == hf_o[3, 2 * hd + 1]


def test_ignorable_names():
    tied = CONFIGS["qwen3"]
    assert table.ignorable_hf_name("lm_head.weight", tied)
    assert not table.ignorable_hf_name("lm_head.weight", CONFIGS["llama2"])
    assert table.ignorable_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq", CONFIGS["llama2"])


PUBLISHED = {  # parameters of the HF checkpoint (its model card / safetensors index)
    "llama31_70b": 70.55e9, "qwen25_0_5b": 0.494e9,  # Qwen2.5-0.5B: tied head
    "gemma2_2b": 2.614e9, "gemma2_9b": 9.242e9, "gemma2_27b": 27.227e9, "gemma3_1b": 1.000e9,
    # the multimodal Gemma 3: its language model, the checkpoints' 4.30B / 12.19B / 27.43B less
    # their ~0.42B SigLIP tower and projector (the same 0.42B each time: the tower is shared)
    "gemma3_4b": 3.880e9, "gemma3_12b": 11.766e9, "gemma3_27b": 27.009e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_build_abstractly_with_the_published_parameter_count(name):
    config = PRESETS[name]()
    total = sum(int(np.prod(x.shape)) for x in _flat_params(config).values())
    want = PUBLISHED[name]
    assert abs(total - want) / want < 0.01
