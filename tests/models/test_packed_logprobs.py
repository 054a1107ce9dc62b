"""Packed [x | y | y2] forwards equal the padded forwards, per example (issue 13 item 3).

Same examples, same model: log pi(y|x) and log pi(y_kl|x) (y_kl = y_{i+1 mod M}) from
one packed forward equal the two padded forwards of kto_jax/models/logprobs.py within 1e-5
(float32), for Llama-, Qwen2- (q/k/v bias), Mistral- (sliding window), Ministral-
(sliding and global layers interleaved) and Gemma 2/3-shaped (soft-caps, q/k norms,
two RoPE tables) tiny models, with XLA's attention and
the splash kernel (Pallas interpret mode on CPU); the paired layout [x | y_w | y_l]
too, and the gradients of the packed log-probs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kto_jax.data import packing
from kto_jax.models.logprobs import completion_logps
from kto_jax.models.config import tiny
from kto_jax.models.transformer import Transformer
from kto_jax.models.packed_logprobs import packed_completion_logps

T = 128  # pack_length: the splash block
CONFIGS = {
    "llama": tiny(),
    "qwen2": tiny(architecture="Qwen2ForCausalLM", attention_bias=True),
    "mistral": tiny(architecture="MistralForCausalLM", sliding_window=7),  # < the sequences
    "ministral": tiny(architecture="MinistralForCausalLM", sliding_window=7, num_layers=3,  # per-layer windows
                      layer_types=("full_attention", "sliding_attention", "full_attention")),
    # Gemma 2: soft-capped attention logits (the splash kernel's cap; explicit logits with XLA)
    # and final logits, a query scale other than head_dim, sliding and global layers
    "gemma2": tiny(architecture="Gemma2ForCausalLM", sliding_window=7, query_pre_attn_scalar=24,
                   attn_logit_softcap=0.05, final_logit_softcap=0.3,
                   layer_types=("sliding_attention", "full_attention")),
    # Gemma 3: q/k norms, the sliding layers' own RoPE base, the global one scaled
    "gemma3": tiny(architecture="Gemma3ForCausalLM", qk_norm=True, sliding_window=7,
                   query_pre_attn_scalar=24, rope_theta=1e6, rope_local_theta=1e4,
                   rope_scaling={"rope_type": "linear", "factor": 8.0},
                   layer_types=("sliding_attention", "full_attention")),
}


def _examples(seed, m, max_prompt=40, max_completion=30):
    rng = np.random.default_rng(seed)
    def seqs(lo, hi):
        return [rng.integers(3, 256, int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(m)]
    return seqs(1, max_prompt), seqs(1, max_completion), seqs(1, max_completion)


def _padded(prompts, completions):
    p = max(map(len, prompts))
    c = max(map(len, completions))
    x, xm = np.zeros((len(prompts), p), np.int32), np.zeros((len(prompts), p), np.int32)
    y, ym = np.zeros((len(prompts), c), np.int32), np.zeros((len(prompts), c), np.int32)
    for i, (a, b) in enumerate(zip(prompts, completions)):
        x[i, p - len(a):], xm[i, p - len(a):] = a, 1
        y[i, :len(b)], ym[i, :len(b)] = b, 1
    return x, xm, y, ym


def _pack(pack, prompts, *completions, groups=1):
    lengths = sum(np.array([len(s) for s in seqs]) for seqs in (prompts,) + completions)
    if pack is packing.pack_unpaired:  # y2 of example i is y_{i+1}
        lengths = np.array([len(p) for p in prompts]) + np.array([len(c) for c in completions[0]]) \
            + np.array([len(c) for c in packing.kl_completions(completions[0])])
    rows = packing.rows_needed(lengths, T, groups)
    c = max(len(s) for seqs in completions for s in seqs)
    batch = pack(prompts, *completions, pack_length=T, num_rows=rows, completion_length=c,
                 pad_id=0, groups=groups)
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unpaired_packed_logps_equal_padded(name, impl):
    model = Transformer(CONFIGS[name].replace(attention_impl=impl), rngs=nnx.Rngs(0))
    prompts, ys, _ = _examples(1, 6)
    batch = _pack(packing.pack_unpaired, prompts, ys)
    assert batch["packed_ids"].shape[0] >= 2  # several rows, several examples per row
    pol, kl = jax.jit(lambda b: packed_completion_logps(model, b, packing.UNPAIRED_NAMES))(batch)
    ref_model = Transformer(CONFIGS[name].replace(attention_impl="xla"), rngs=nnx.Rngs(0))
    padded = jax.jit(lambda *a: completion_logps(ref_model, *a))
    want = padded(*_padded(prompts, ys))
    want_kl = padded(*_padded(prompts, packing.kl_completions(ys)))
    c = batch["completion_ids"].shape[1]
    np.testing.assert_allclose(pol.logps, want.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl.logps, want_kl.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pol.token_logps, want.token_logps[:, :c], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl.token_counts, want_kl.token_counts)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_paired_packed_logps_equal_padded(impl):
    model = Transformer(CONFIGS["mistral"].replace(attention_impl=impl), rngs=nnx.Rngs(1))
    prompts, chosen, rejected = _examples(2, 4)
    batch = _pack(packing.pack_paired, prompts, chosen, rejected, groups=2)
    yw, yl = jax.jit(lambda b: packed_completion_logps(model, b, packing.PAIRED_NAMES,
                                                       groups=2))(batch)
    ref_model = Transformer(CONFIGS["mistral"].replace(attention_impl="xla"), rngs=nnx.Rngs(1))
    padded = jax.jit(lambda *a: completion_logps(ref_model, *a).logps)
    np.testing.assert_allclose(yw.logps, padded(*_padded(prompts, chosen)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(yl.logps, padded(*_padded(prompts, rejected)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2"])  # Gemma's gradients: tests/step/test_packed_step.py
def test_gradients_of_packed_logps_equal_padded(name):
    """d/dparams of sum_i a_i log pi(y_i|x_i) + b_i log pi(y_kl_i|x_i), packed vs padded."""
    cfg = CONFIGS[name].replace(attention_impl="xla")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    prompts, ys, _ = _examples(3, 4, max_prompt=20, max_completion=12)
    batch = _pack(packing.pack_unpaired, prompts, ys, groups=2)
    a, b = jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4)

    def packed(params):
        pol, kl = packed_completion_logps(nnx.merge(graphdef, params), batch,
                                          packing.UNPAIRED_NAMES, groups=2)
        return jnp.sum(a * pol.logps + b * kl.logps)

    def padded(params):
        model = nnx.merge(graphdef, params)
        pol = completion_logps(model, *_padded(prompts, ys))
        kl = completion_logps(model, *_padded(prompts, packing.kl_completions(ys)))
        return jnp.sum(a * pol.logps + b * kl.logps)

    got, want = jax.jit(jax.grad(packed))(params), jax.jit(jax.grad(padded))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
