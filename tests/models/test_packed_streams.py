"""The two-stream packed layout (packing.pack_streams): main rows [x | y] with gradient, kl
rows of y_kl run without one, reusing the main rows' x keys and values.

Per example, log pi(y|x) and log pi(y_kl|x) equal the padded forwards within 1e-5
(float32) for every family shape of test_packed_logprobs (sliding windows in position
space, soft-caps, two RoPE tables), with XLA's attention and the splash kernel on the
main rows; the gradient of log pi(y|x) equals the padded one and y_kl carries none;
and, counted by XLA's cost analysis, the kl rows add their forward alone to a
differentiated, rematerialised forward: no backward and no recomputation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_packed_logprobs import CONFIGS, _examples, _padded

from kto_jax.data import packing
from kto_jax.models.logprobs import completion_logps
from kto_jax.models.packed_logprobs import kl_rows_of, packed_completion_logps, packed_layout
from kto_jax.models.transformer import Transformer

T = 128  # main rows: the splash block


def _streams(prompts, ys, groups=1, kl_share=0.5):
    kl = packing.kl_completions(ys)
    main = np.array([len(p) + len(y) for p, y in zip(prompts, ys)])
    trees = packing.stream_lengths(main, np.array([len(k) for k in kl]), kl_share)
    c = max(len(s) for s in ys)
    batch = packing.pack_streams(prompts, ys, kl, pack_length=T, kl_share=kl_share,
                                 num_rows=packing.rows_needed(trees, T, groups),
                                 completion_length=c, pad_id=0, groups=groups)
    return {k: jnp.asarray(v) for k, v in batch.items()}, kl


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kl_stream_logps_equal_padded(name, impl):
    model = Transformer(CONFIGS[name].replace(attention_impl=impl), rngs=nnx.Rngs(0))
    prompts, ys, _ = _examples(1, 8)
    batch, kl = _streams(prompts, ys, groups=2)
    assert batch["packed_ids"].shape[0] < 8 and batch["kl_row_ids"].shape[1] == T // 2
    pol, pol_kl = jax.jit(lambda b: packed_completion_logps(model, b, packing.UNPAIRED_NAMES,
                                                            groups=2))(batch)
    ref_model = Transformer(CONFIGS[name].replace(attention_impl="xla"), rngs=nnx.Rngs(0))
    padded = jax.jit(lambda *a: completion_logps(ref_model, *a))
    want, want_kl = padded(*_padded(prompts, ys)), padded(*_padded(prompts, kl))
    c = batch["completion_ids"].shape[1]
    np.testing.assert_allclose(pol.logps, want.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pol_kl.logps, want_kl.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pol_kl.token_logps, want_kl.token_logps[:, :c], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pol_kl.token_counts, want_kl.token_counts)


def test_kl_stream_gradients_are_the_matched_pairs_alone():
    """d/dparams of sum_i a_i log pi(y_i|x_i) + b_i log pi(y_kl_i|x_i): packed streams = the
    padded gradient of the first term alone (y_kl is a constant), the second's values equal."""
    cfg = CONFIGS["gemma2"].replace(attention_impl="xla")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    prompts, ys, _ = _examples(3, 4, max_prompt=20, max_completion=12)
    batch, kl = _streams(prompts, ys, groups=2)
    a, b = jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4)

    def packed(params):
        pol, pol_kl = packed_completion_logps(nnx.merge(graphdef, params), batch,
                                              packing.UNPAIRED_NAMES, groups=2)
        return jnp.sum(a * pol.logps + b * pol_kl.logps)

    def padded(params):
        model = nnx.merge(graphdef, params)
        pol = completion_logps(model, *_padded(prompts, ys))
        pol_kl = completion_logps(model, *_padded(prompts, kl))
        return jnp.sum(a * pol.logps + b * jax.lax.stop_gradient(pol_kl.logps))

    (got_v, got), (want_v, want) = (jax.jit(jax.value_and_grad(f))(params) for f in (packed, padded))
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-5)
    assert max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want)) > 1e-3
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_kl_stream_costs_its_forward_alone_in_a_differentiated_step(remat):
    """value-and-grad FLOPs(main + kl rows) - those of the main rows = forward FLOPs(main + kl rows) -
    forward FLOPs(main rows): the layer scan runs the kl rows once, forward, whatever the
    remat policy. A backward (or a recomputation under remat) of the kl rows would add
    twice (or once) that forward again."""
    cfg = CONFIGS["llama"].replace(attention_impl="xla", remat_policy=remat, num_layers=2)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompts, ys, _ = _examples(5, 8)
    batch, _ = _streams(prompts, ys)
    layout = packed_layout(batch)

    def loss(params, with_kl):
        model = nnx.merge(graphdef, params)
        kl = kl_rows_of(batch) if with_kl else None
        hidden = model.hidden_states(batch["packed_ids"], layout.positions, packed=layout,
                                     kl_rows=kl)
        if not with_kl:
            return jnp.sum(hidden.astype(jnp.float32) ** 2)
        return jnp.sum(hidden[0].astype(jnp.float32) ** 2) + jnp.sum(hidden[1] ** 2)

    flops = {(g, k): _flops(functools.partial(jax.value_and_grad(loss) if g else loss, with_kl=k), params)
             for g in (True, False) for k in (True, False)}
    forward_kl = flops[False, True] - flops[False, False]
    assert forward_kl > 0.1 * flops[False, False]
    assert flops[True, True] - flops[True, False] == pytest.approx(forward_kl, rel=0.05)
