"""The mixture-of-experts block (kto_jax/models/moe.py) against hand computations; the
checkpoints' layouts it reads or refuses. Parity with transformers: tests/models/test_hf_io.py
(cases qwen3_moe, mixtral)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.errors import UserError
from kto_jax.models import moe
from kto_jax.models.config import ModelConfig, preset


def _config(**overrides) -> ModelConfig:
    return ModelConfig(**{"architecture": "Qwen3MoeForCausalLM", "qk_norm": True, "num_experts": 8,
                          "num_experts_per_tok": 2, "moe_intermediate_size": 16, **overrides})


def _weights(cfg: ModelConfig, seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shapes = moe.MOE_MLP.shapes(cfg)
    return {name: 0.3 * jax.random.normal(k, shapes[name]) for k, name in zip(keys, shapes)}


def _by_hand(p: dict, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Token by token, expert by expert, in float64 numpy."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    out = np.zeros_like(x, dtype=np.float64)
    for n, token in enumerate(np.asarray(x, np.float64)):
        logits = token @ p["router"]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        chosen = np.argsort(-probs)[:cfg.num_experts_per_tok]
        weights = probs[chosen] / (probs[chosen].sum() if cfg.norm_topk_prob else 1.0)
        for e, w in zip(chosen, weights):
            gate, up = token @ p["expert_gate_proj"][e], token @ p["expert_up_proj"][e]
            out[n] += w * ((gate / (1 + np.exp(-gate))) * up) @ p["expert_down_proj"][e]
    return out


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("impl", moe.MOE_IMPLS)
def test_moe_mlp_equals_the_token_by_token_sum(norm_topk_prob, impl):
    cfg = _config(norm_topk_prob=norm_topk_prob, moe_impl=impl)
    p = _weights(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, cfg.hidden_size))
    got = np.asarray(moe.moe_mlp(p, x, cfg)).reshape(15, -1)
    np.testing.assert_allclose(got, _by_hand(p, np.asarray(x).reshape(15, -1), cfg), atol=2e-5, rtol=1e-5)


def test_grouped_and_dense_experts_have_equal_gradients():
    cfg = _config(norm_topk_prob=True)
    p = _weights(cfg, seed=2)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, cfg.hidden_size))

    def loss(p, x, impl):
        return jnp.sum(jnp.sin(moe.moe_mlp(p, x, cfg.replace(moe_impl=impl))))

    dense = jax.grad(loss, argnums=(0, 1))(p, x, "dense")
    for impl in ("ragged", "blocks"):
        grouped = jax.grad(loss, argnums=(0, 1))(p, x, impl)
        for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(dense)):  # float32 sums in other orders
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4, err_msg=impl)


def _expert_adapters(cfg: ModelConfig, rank: int = 3, seed: int = 7) -> dict:
    """Per-expert LoRA factors as a layer's p holds them (B already scaled)."""
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"expert_gate_up_proj_lora_a": (e, d, rank), "expert_gate_up_proj_lora_b": (e, rank, 2 * f),
              "expert_down_proj_lora_a": (e, f, rank), "expert_down_proj_lora_b": (e, rank, d)}
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {name: 0.3 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}


def _merged_by_hand(p: dict, factors: dict) -> dict:
    """The expert weights W + A_e B_e, expert by expert (gate_up's B: gate's columns, then up's)."""
    delta = {t: np.einsum("edr,erf->edf", np.asarray(factors[t + "_lora_a"], np.float64),
                          np.asarray(factors[t + "_lora_b"], np.float64))
             for t in ("expert_gate_up_proj", "expert_down_proj")}
    f = p["expert_gate_proj"].shape[-1]
    return {**p, "expert_gate_proj": p["expert_gate_proj"] + delta["expert_gate_up_proj"][..., :f],
            "expert_up_proj": p["expert_up_proj"] + delta["expert_gate_up_proj"][..., f:],
            "expert_down_proj": p["expert_down_proj"] + delta["expert_down_proj"]}


@pytest.mark.parametrize("impl", moe.MOE_IMPLS)
def test_expert_adapters_equal_the_merged_experts_by_hand(impl):
    """LoRA on every expert's gate/up/down through the grouped (and dense) matmuls = the
    token-by-token sum with the hand-merged weights W_e + A_e B_e."""
    cfg = _config(norm_topk_prob=True, moe_impl=impl)
    p, factors = _weights(cfg, seed=8), _expert_adapters(cfg)
    x = jax.random.normal(jax.random.PRNGKey(9), (3, 5, cfg.hidden_size))
    got = np.asarray(moe.moe_mlp({**p, **factors}, x, cfg)).reshape(15, -1)
    want = _by_hand(_merged_by_hand(p, factors), np.asarray(x).reshape(15, -1), cfg)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)
    assert np.abs(want - _by_hand(p, np.asarray(x).reshape(15, -1), cfg)).max() > 1e-2  # the adapters matter


def test_expert_adapter_gradients_equal_the_merged_weights_gradients():
    """d/dA, d/dB through the grouped matmuls (ragged, blocks) = through W + A B merged and
    run densely."""
    cfg = _config(norm_topk_prob=True)
    p, factors = _weights(cfg, seed=10), _expert_adapters(cfg, seed=11)
    x = jax.random.normal(jax.random.PRNGKey(12), (2, 7, cfg.hidden_size))
    f = cfg.moe_intermediate_size

    def merged(factors):
        d = {t: jnp.einsum("edr,erf->edf", factors[t + "_lora_a"], factors[t + "_lora_b"],
                           precision=jax.lax.Precision.HIGHEST) for t in ("expert_gate_up_proj", "expert_down_proj")}
        return {**p, "expert_gate_proj": p["expert_gate_proj"] + d["expert_gate_up_proj"][..., :f],
                "expert_up_proj": p["expert_up_proj"] + d["expert_gate_up_proj"][..., f:],
                "expert_down_proj": p["expert_down_proj"] + d["expert_down_proj"]}

    want = jax.grad(lambda fs: jnp.sum(jnp.sin(moe.moe_mlp(merged(fs), x, cfg.replace(moe_impl="dense")))))(factors)
    for impl in ("ragged", "blocks"):
        got = jax.grad(lambda fs: jnp.sum(jnp.sin(moe.moe_mlp({**p, **fs}, x, cfg.replace(moe_impl=impl)))))(factors)
        for name in factors:
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), atol=1e-4, rtol=1e-4,
                                       err_msg=f"{impl} {name}")


def test_blocked_matmul_equals_ragged_dot_with_empty_and_full_groups():
    rows = jax.random.normal(jax.random.PRNGKey(0), (10, 6))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 5))
    for sizes in ([3, 0, 5, 2], [10, 0, 0, 0], [0, 0, 0, 10], [4, 4, 1, 1]):
        sizes = jnp.asarray(sizes, jnp.int32)
        np.testing.assert_allclose(np.asarray(moe.blocked_matmul(rows, w, sizes, block=4)),
                                   np.asarray(jax.lax.ragged_dot(rows, w, sizes)), rtol=1e-6, atol=1e-6)


def test_grouped_experts_see_only_their_tokens():
    """An expert no token chose gets a zero gradient; the others a non-zero one."""
    cfg = _config()
    p = _weights(cfg, seed=4)
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 3, cfg.hidden_size))
    _, _, experts = moe.route(p, x[0], cfg)
    grads = jax.grad(lambda w: jnp.sum(moe.moe_mlp({**p, "expert_up_proj": w}, x, cfg)))(p["expert_up_proj"])
    used = set(np.asarray(experts).ravel().tolist())
    for e in range(cfg.num_experts):
        assert (np.abs(np.asarray(grads[e])).sum() > 0) == (e in used), e


def test_dense_layers_among_sparse_ones_follow_transformers_rule():
    """Layer i is dense when i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0
    (transformers' Qwen3MoeDecoderLayer); its MLP weights stack the dense layers, the router
    and experts the sparse ones; a config with no sparse layer, or with dense layers on a
    quantised base, is refused by name."""
    from kto_jax.models.quantize import Quantization
    hf = preset("qwen3_30b_a3b").to_hf()
    assert ModelConfig.from_hf(hf).dense_mlp_layers == ()
    assert ModelConfig.from_hf(hf).mlp_rows() is None
    cfg = ModelConfig.from_hf({**hf, "mlp_only_layers": [3, 0]})
    assert cfg.dense_mlp_layers == (0, 3)
    assert cfg.stack_layers("gate_proj") == (0, 3) and cfg.stack_layers("q_proj") == tuple(range(48))
    assert cfg.stack_layers("expert_up_proj") == tuple(i for i in range(48) if i not in (0, 3))
    step = ModelConfig.from_hf({**hf, "num_hidden_layers": 6, "decoder_sparse_step": 3, "mlp_only_layers": [2]})
    assert step.dense_mlp_layers == (0, 1, 2, 3, 4)
    assert step.mlp_rows() == ((0, 0, 0, 0, 0, 1), (0, 1, 2, 3, 4, 0))
    assert ModelConfig.from_hf(step.to_hf()) == step
    with pytest.raises(UserError, match=r"no sparse layer.*decoder_sparse_step=2.*Qwen3ForCausalLM"):
        ModelConfig.from_hf({**hf, "num_hidden_layers": 1, "decoder_sparse_step": 2})
    with pytest.raises(UserError, match="no sparse layer"):
        ModelConfig.from_hf({**hf, "num_experts": 0})
    with pytest.raises(UserError, match=r"dense MLP layers among the sparse ones \(\[0, 3\]\) on a quantised base"):
        cfg.replace(quantization=Quantization(scheme="nf4"))


def test_expert_counts_are_checked():
    with pytest.raises(UserError, match="num_experts_per_tok"):
        _config(num_experts_per_tok=9)
    with pytest.raises(UserError, match="num_experts_per_tok"):
        ModelConfig(architecture="MixtralForCausalLM", norm_topk_prob=True)
    with pytest.raises(UserError, match="num_experts=8 does not match LlamaForCausalLM"):
        ModelConfig(num_experts=8)


def test_presets_read_back_and_count_their_parameters():
    """Qwen3-30B-A3B: 30.5B parameters; Mixtral 8x7B: 46.7B (the model cards' figures)."""
    from kto_jax.models.transformer import abstract_model
    for name, billions in (("qwen3_30b_a3b", 30.5), ("mixtral_8x7b", 46.7)):
        cfg = preset(name)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
        count = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_model(cfg)))
        assert round(count / 1e9, 1) == billions, (name, count)


def test_flops_count_the_active_parameters():
    """Qwen3-30B-A3B runs 3.3B parameters per token (the model card), Mixtral 8x7B 12.9B;
    the FLOP count's matmul parameters are those without the embedding (lm_head counted)."""
    from kto_jax.step.flops import ModelDims
    for name, active in (("qwen3_30b_a3b", 3.3e9), ("mixtral_8x7b", 12.9e9)):
        cfg = preset(name)
        dims = ModelDims.of(cfg)
        assert dims.experts == cfg.num_experts and dims.experts_per_token == cfg.num_experts_per_tok
        norms = cfg.num_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
        embed = cfg.vocab_size * cfg.hidden_size
        np.testing.assert_allclose(dims.matmul_params() + embed + norms, active, rtol=0.02)
        # one expert of one layer more per token: exactly its three projections more
        more = dataclasses.replace(dims, experts_per_token=dims.experts_per_token + 1)
        assert more.matmul_params() - dims.matmul_params() == dims.layers * 3 * dims.hidden * dims.intermediate


def test_flops_count_dense_layers_at_their_width():
    """A dense layer among the sparse ones counts its gated MLP (3 D F) instead of k experts
    plus the router; the count from config.json (decoder_sparse_step 2) is the config's."""
    from kto_jax.step.flops import ModelDims
    hf = {**preset("qwen3_30b_a3b").to_hf(), "num_hidden_layers": 4, "decoder_sparse_step": 2}
    cfg = ModelConfig.from_hf(hf)
    dims, sparse = ModelDims.of(cfg), ModelDims.of(preset("qwen3_30b_a3b", num_layers=4))
    assert dims == ModelDims.from_hf_config(hf) and dims.dense_layers == 2
    d, f, fe = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size
    per_sparse = 3 * d * fe * cfg.num_experts_per_tok + d * cfg.num_experts
    assert sparse.matmul_params() - dims.matmul_params() == 2 * (per_sparse - 3 * d * f)



@pytest.mark.parametrize("dense_mlp_layers", [(), (1,)])
def test_expert_mesh_gives_the_one_device_loss_and_gradients(dense_mlp_layers):
    """data=2 x expert=4 on 8 CPU devices: each layer's 8 experts split 2 per device, the batch
    split over all 8; the loss and every gradient equal one device's up to float32 rounding
    (also with a dense layer between two sparse ones: the experts' exchange inside the cond)."""
    from flax import nnx
    from hf_tiny_models import base_config
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kto_jax import sharding as shd
    from kto_jax.models.transformer import Transformer

    rules = base_config().mesh.rules
    cfg = _config(norm_topk_prob=True, num_layers=2 + len(dense_mlp_layers), dense_mlp_layers=dense_mlp_layers)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)), jnp.int32)

    def loss(params, ids):  # next-token cross-entropy
        logps = jax.nn.log_softmax(nnx.merge(graphdef, params)(ids)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logps, ids[:, 1:, None], -1))

    want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(params, ids)
    mesh = shd.make_mesh({"data": 2, "expert": 4})
    p_sh = shd.named_shardings(params, mesh, rules)
    assert p_sh["layers"]["expert_up_proj"].get_value().spec == P(None, "expert", "fsdp", "tensor")
    step = jax.jit(shd.activation_sharding(jax.value_and_grad(loss), mesh, rules),
                   in_shardings=(p_sh, NamedSharding(mesh, P(("data", "fsdp", "expert")))),
                   out_shardings=(None, p_sh))
    got_loss, got_grads = step(jax.device_put(params, p_sh), ids)
    shard = got_grads["layers"]["expert_up_proj"].get_value().addressable_shards[0].data
    assert shard.shape == (2, 2, cfg.hidden_size, cfg.moe_intermediate_size)  # the 2 sparse layers
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_gpt_oss_is_refused_naming_what_is_missing():
    """transformers' own gpt-oss config.json gets one line naming what the MoE layer lacks."""
    import transformers
    hf = transformers.GptOssConfig(num_hidden_layers=2).to_dict()
    for config in (hf, {k: v for k, v in hf.items() if k != "architectures"}):  # by model_type too
        with pytest.raises(UserError, match="GptOssForCausalLM: gpt-oss is not supported.*sink.*MXFP4"):
            ModelConfig.from_hf({**config, "architectures": ["GptOssForCausalLM"]} if config is hf else config)


def test_lora_on_dense_and_sparse_layers_follows_each_stack():
    """With dense layers among the sparse ones, each target's factors stack its own layers
    (attention: all 3, the dense MLP's: 1, the experts': 2) and the attached forward (the
    scan's MLP cond taking each layer's row of the factors) = the merged model's."""
    from flax import nnx
    from kto_jax.models import lora
    from kto_jax.models.transformer import Transformer
    cfg = _config(num_layers=3, dense_mlp_layers=(1,), hidden_size=32, vocab_size=64)
    targets = ("q_proj", "o_proj", "up_proj", "down_proj", "expert_gate_up_proj", "expert_down_proj")
    settings = lora.LoraConfig(rank=2, alpha=4.0, target_modules=targets)
    lora.validate(settings, cfg)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    adapters = lora.LoraAdapters(cfg, settings, rngs=nnx.Rngs(1))
    assert [adapters.factors(t)[0].shape[0] for t in targets] == [3, 3, 1, 1, 2, 2]
    for i, t in enumerate(targets):
        b = getattr(adapters, t + lora.B_SUFFIX)
        b.set_value(0.1 * jax.random.normal(jax.random.key(i), b[...].shape))
    ids = jax.random.randint(jax.random.key(5), (2, 7), 0, 64)
    got = lora.attach(model, adapters)(ids)
    want = lora.merge(model, adapters)(ids)
    assert np.abs(np.asarray(got - model(ids))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
