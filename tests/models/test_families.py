"""Model families as plug-ins: the registry, the feature switches, and the per-layer scan.

A toy family registered for the test (Gemma-like switches: a (1 + w) norm, norms after
attention and the MLP, a scaled embedding, GeGLU, q/k norm, sliding and global layers
with their own RoPE bases) runs through the same layer scan as the real families and
is checked against a float64 numpy forward written here from the definitions.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny_models import HF_CASES

from kto_jax.errors import UserError
from kto_jax.models import params as table
from kto_jax.models.config import PRESETS, ModelConfig, ministral_8b, tiny
from kto_jax.models.families import FAMILIES
from kto_jax.models.family import (BASE_ROWS, IDENTITY, QK_NORM_ROWS, Family, NormPlacement,
                                   layer_row)
from kto_jax.models.transformer import Transformer, abstract_model, init_kv_cache, positions_from_mask
from kto_jax.step.flops import ModelDims

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "models.md")


def test_every_family_has_a_preset_a_parity_case_and_a_docs_row():
    """What adding a family means: its module (in FAMILIES), a preset, a tiny HF case, a docs row."""
    docs = open(DOCS, encoding="utf-8").read()
    preset_archs = {p().architecture for p in PRESETS.values()}
    case_types = {cls.model_type for cls, _ in HF_CASES.values()}
    for arch, family in FAMILIES.items():
        assert arch in preset_archs, f"{arch}: add a preset to kto_jax/models/config.py"
        assert family.model_type in case_types, f"{arch}: add a case to tests/models/hf_tiny_models.py"
        assert f"| `{arch}` |" in docs, f"{arch}: add its row to docs/models.md"


def test_unsupported_architecture_names_every_family():
    with pytest.raises(UserError, match=", ".join(FAMILIES)):
        ModelConfig(architecture="GPT2LMHeadModel")


@pytest.mark.parametrize("config_class", ["Gemma4TextConfig", "Gemma4Config"])
def test_gemma4_is_refused_naming_what_is_missing(config_class):
    """transformers' own Gemma 4 config.json (text and multimodal) gets one line that says
    what the layer design lacks for it."""
    import transformers
    hf = getattr(transformers, config_class)().to_dict()
    hf["architectures"] = ["Gemma4ForConditionalGeneration" if config_class == "Gemma4Config"
                           else "Gemma4ForCausalLM"]
    for config in (hf, {**hf, "architectures": None}):  # named, or known by model_type
        with pytest.raises(UserError, match=r"Gemma4For\w+: Gemma 4 is not supported.*head_dim 512"
                           r".*per-layer input embeddings.*mixture-of-experts.*Gemma 3"):
            ModelConfig.from_hf(config)


@pytest.mark.parametrize("change,match", [
    ({"layer_types": ("sliding_attention", "full_attention")}, "layer_types.*MinistralForCausalLM"),
    ({"sliding_window": 4}, "sliding_window.*MistralForCausalLM"),
    ({"rope_local_theta": 10.0}, "rope_local_theta.*Gemma3ForCausalLM"),
    ({"attn_logit_softcap": 50.0}, "attn_logit_softcap.*Gemma2ForCausalLM"),
])
def test_a_feature_outside_the_family_is_named(change, match):
    with pytest.raises(UserError, match=match):
        tiny(**change)


@pytest.mark.parametrize("types,match", [
    (("full_attention",), "2 entries"),
    (("full_attention", "local"), "sliding_attention"),
    (("sliding_attention", "full_attention"), "sliding_window"),
])
def test_bad_layer_types_are_named(types, match):
    with pytest.raises(UserError, match=match):
        tiny(architecture="MinistralForCausalLM", layer_types=types)


def test_layer_kinds_of_an_interleaved_model():
    kinds, ids = ministral_8b().layer_kinds()
    assert [(k.window, k.rope) for k in kinds] == [(None, 0), (32768, 0)]
    assert ids == (0, 1, 1, 1) * 9
    # layer_types equal to the default (every layer sliding) is the same config as none.
    every = tiny(architecture="MinistralForCausalLM", sliding_window=4, layer_types=("sliding_attention",) * 2)
    assert every == tiny(architecture="MinistralForCausalLM", sliding_window=4) and every.layer_types is None
    assert len(every.layer_kinds()[0]) == 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flop_dims_match_the_hf_config_reading(name):
    """ModelConfig.flop_dims (what step/flops.py can read) equals ModelDims.from_hf_config(to_hf())."""
    config = PRESETS[name]()
    hf = config.to_hf()
    assert ModelDims(**config.flop_dims()) == ModelDims.from_hf_config(hf.get("text_config", hf))


def _jaxpr(config):
    graphdef, state = nnx.split(abstract_model(config))
    ids = jnp.zeros((1, 8), jnp.int32)
    return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).hidden_states(ids))(state))


def test_interleaved_layers_share_one_scan_body():
    """Layers that alternate run in one scan with a switch inside; alike layers have no switch."""
    interleaved = _jaxpr(tiny(architecture="MinistralForCausalLM", sliding_window=4, num_layers=6,
                              layer_types=("full_attention", "sliding_attention", "sliding_attention") * 2))
    alike = _jaxpr(tiny(num_layers=6))
    assert interleaved.count("scan[") == alike.count("scan[") == 1
    assert "cond[" in interleaved and "cond[" not in alike


SPLASH_CASES = {
    "ministral": tiny(architecture="MinistralForCausalLM", sliding_window=16, num_layers=3,
                      layer_types=("sliding_attention", "full_attention", "sliding_attention")),
    # soft-capped attention logits: the kernel's attn_logits_soft_cap against explicit XLA logits
    "gemma2": tiny(architecture="Gemma2ForCausalLM", sliding_window=16, num_layers=2,
                   query_pre_attn_scalar=24, attn_logit_softcap=0.05, final_logit_softcap=0.3,
                   layer_types=("sliding_attention", "full_attention")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SPLASH_CASES))
def test_interleaved_layers_with_splash_and_remat_equal_xla(case):
    """The splash kernel (Pallas interpret mode here) inside the per-layer switch, under
    full remat, gives XLA's values and gradients."""
    config = SPLASH_CASES[case]
    ids = np.random.default_rng(2).integers(1, 256, (2, 128)).astype(np.int32)
    weight = jnp.cos(jnp.arange(config.hidden_size, dtype=jnp.float32))

    def loss(model):
        return jnp.sum(model.hidden_states(ids) * weight)

    out = {}
    for impl, remat in (("xla", "none"), ("splash", "full")):
        model = Transformer(config.replace(attention_impl=impl, remat_policy=remat), rngs=nnx.Rngs(0))
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        out[impl] = (value, jax.tree.leaves(nnx.state(grads, nnx.Param)))
    np.testing.assert_allclose(out["splash"][0], out["xla"][0], rtol=1e-4)
    for got, want in zip(out["splash"][1], out["xla"][1]):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


# ---- a toy family with every switch on, against a numpy forward ----

def one_plus_norm(x, weight, eps):
    """RMSNorm scaled by (1 + w), all in float32 (the formula a family may choose)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


TOY_NORMS = NormPlacement(before_attention="input_layernorm", before_mlp="pre_feedforward_layernorm",
                          after_attention="post_attention_layernorm",
                          after_mlp="post_feedforward_layernorm")
TOY = Family(
    architecture="ToyForCausalLM", model_type="toy",
    rows=BASE_ROWS + QK_NORM_ROWS + (  # HF post_attention_layernorm: here the norm after attention
        layer_row("pre_feedforward_layernorm", "pre_feedforward_layernorm.weight", IDENTITY),
        layer_row("post_feedforward_layernorm", "post_feedforward_layernorm.weight", IDENTITY)),
    fixed={"qk_norm": True}, options=("sliding_window", "layer_types", "rope_local_theta"),
    norm=one_plus_norm, norms=TOY_NORMS, embed_scale=True)


@pytest.fixture
def toy(monkeypatch):
    """(model with random weights, its config) of the toy family, registered for the test."""
    monkeypatch.setitem(FAMILIES, TOY.architecture, TOY)
    config = ModelConfig(architecture="ToyForCausalLM", num_layers=3, sliding_window=3, hidden_act="gelu_pytorch_tanh",
                         qk_norm=True, rope_theta=10000.0, rope_local_theta=100.0, tie_word_embeddings=True,
                         layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), state)
    return nnx.merge(graphdef, state), config


def _reference_hidden(params: dict, cfg: ModelConfig, ids: np.ndarray) -> np.ndarray:
    """Final hidden states [n, D] of one unpadded row, float64, from the definitions."""
    n, hd, eps = len(ids), cfg.head_dim, cfg.rms_norm_eps
    group = cfg.num_heads // cfg.num_kv_heads

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)

    def rope(x, theta):  # [n, N, hd], half-split pairs
        angles = np.arange(n)[:, None] / theta ** (np.arange(0, hd, 2) / hd)
        c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    h = params[("embed_tokens",)][ids] * np.sqrt(cfg.hidden_size)
    for i, kind in enumerate(cfg.attention_types):
        p = {path[1]: w[i] for path, w in params.items() if path[0] == "layers"}
        sliding = kind == "sliding_attention"
        theta = cfg.rope_local_theta if sliding else cfg.rope_theta
        x = norm(h, p["input_layernorm"])
        q = rope(norm(np.einsum("td,dnh->tnh", x, p["q_proj"]), p["q_norm"]), theta)
        k = rope(norm(np.einsum("td,dnh->tnh", x, p["k_proj"]), p["k_norm"]), theta)
        v = np.einsum("td,dnh->tnh", x, p["v_proj"])
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qnh,knh->nqk", q, k) / np.sqrt(hd)
        query, key = np.arange(n)[:, None], np.arange(n)[None]
        seen = (key <= query) & ((query - key < cfg.sliding_window) | (not sliding))
        scores = np.where(seen, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("nqk,knh,nhd->qd", probs, v, p["o_proj"])
        h = h + norm(out, p["post_attention_layernorm"])
        x = norm(h, p["pre_feedforward_layernorm"])
        mlp = (gelu_tanh(x @ p["gate_proj"]) * (x @ p["up_proj"])) @ p["down_proj"]
        h = h + norm(mlp, p["post_feedforward_layernorm"])
    return norm(h, params[("norm",)])


def _batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 256, size=(2, 10)).astype(np.int32)
    mask = np.ones((2, 10), np.int32)
    mask[1, :3] = 0  # left padding
    ids[mask == 0] = 0
    return ids, mask


def test_toy_family_forward_equals_numpy_reference(toy):
    model, config = toy
    params = {path: np.asarray(v.get_value(), np.float64)
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    paths = {row.path for row in table.param_table(config)}
    assert paths == set(params)  # the family's rows cover its parameters one-to-one
    ids, mask = _batch()
    got = np.asarray(model.hidden_states(ids, positions_from_mask(mask), mask))
    for row in range(2):
        real = mask[row].astype(bool)
        want = _reference_hidden(params, config, ids[row, real])
        np.testing.assert_allclose(got[row, real], want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_toy_family_kv_cache_equals_full_forward(toy):
    """The generation path runs the same per-layer kinds: prefill and one decode step."""
    model, config = toy
    ids, mask = _batch()
    nxt = np.array([[7], [9]], np.int32)
    full_ids, full_mask = np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones((2, 1), np.int32)], 1)
    full = np.asarray(model.hidden_states(full_ids, positions_from_mask(full_mask), full_mask))
    pos = positions_from_mask(mask)
    cache = init_kv_cache(config, 2, 11)
    prefill, cache = model.cached_hidden_states(ids, pos, mask, cache, jnp.int32(0))
    step, _ = model.cached_hidden_states(nxt, pos[:, -1:] + 1, np.ones((2, 1), np.int32), cache, jnp.int32(10))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(prefill)[real], full[:, :10][real], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, 10], atol=1e-5, rtol=1e-5)

