"""The fast paths the step takes are exact: mask-free causal attention on left-aligned rows,
and the attention backend 'auto' resolves to (cuDNN flash attention on GPUs only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kto_jax.models import transformer as T
from kto_jax.models.config import tiny
from kto_jax.train.settings import read_settings, step_settings

MODEL = tiny(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8)


def test_mask_free_hidden_states_equal_masked_ones_on_right_padded_rows():
    """With real tokens first, causal attention alone gives the masked result at every real
    position (a real query's keys are all real)."""
    model = T.Transformer(MODEL, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = np.array([7, 3, 10, 1])
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, 96, (4, 10)).astype(np.int32) * mask
    pos = T.positions_from_mask(mask)
    masked = model.hidden_states(ids, pos, mask)
    free = model.hidden_states(ids, pos, None)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(free)[real], np.asarray(masked)[real], rtol=1e-5, atol=1e-5)


def _q(t, hd=64, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct((2, t, 4, hd), dtype)


def test_auto_attention_is_cudnn_only_on_gpu_for_shapes_cudnn_takes(monkeypatch):
    assert T.resolve_attention_impl("auto", _q(1024)) == "splash_on_tpu"  # CPU: XLA; TPU: splash
    assert T.resolve_attention_impl("auto", _q(1000)) is None
    assert T.resolve_attention_impl("xla", _q(1024)) == "xla"
    assert T.resolve_attention_impl("cudnn", _q(1023)) == "cudnn"  # explicit choice passes
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert T.resolve_attention_impl("auto", _q(1024)) == "cudnn"
    assert T.resolve_attention_impl("auto", _q(1024, hd=128)) == "cudnn"
    for q in (_q(1023), _q(1024, dtype=jnp.float32), _q(1024, hd=256), _q(1024, hd=36)):
        assert T.resolve_attention_impl("auto", q) is None, q
    mask = jnp.ones((2, 1, 1024, 1024), bool)
    assert T.resolve_attention_impl("auto", _q(1024), mask) is None


def test_left_aligned_rotates_each_row_by_its_prompt_padding():
    from kto_jax.models.logprobs import left_aligned
    x = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]], np.int32)
    y = np.array([[12, 13, 0], [15, 0, 0], [16, 17, 18]], np.int32)
    ids, mask, first = left_aligned(x, (x != 0).astype(np.int32), y, (y != 0).astype(np.int32))
    np.testing.assert_array_equal(ids, [[5, 6, 12, 13, 0, 0, 0], [7, 8, 9, 10, 15, 0, 0],
                                        [11, 16, 17, 18, 0, 0, 0]])
    np.testing.assert_array_equal(mask, np.asarray(ids) != 0)
    np.testing.assert_array_equal(first, [2, 4, 1])


def test_completion_logps_run_the_model_without_an_attention_mask():
    """The step's forwards hand the model no [B, 1, T, T] mask (what lets cuDNN run mask-free)."""
    from kto_jax.models.logprobs import completion_logps
    model = T.Transformer(MODEL, rngs=nnx.Rngs(0))
    seen = []
    original = T.Transformer.hidden_states

    def spy(self, ids, pos, mask, **kwargs):
        seen.append(mask)
        return original(self, ids, pos, mask, **kwargs)

    x = np.array([[0, 3, 4], [5, 6, 7]], np.int32)
    y = np.array([[8, 9], [10, 0]], np.int32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T.Transformer, "hidden_states", spy)
        completion_logps(model, x, (x != 0).astype(np.int32), y, (y != 0).astype(np.int32))
    assert seen == [None]


@pytest.mark.slow
def test_no_forward_of_the_step_materialises_full_vocab_logits():
    """The compiled KTO step (policy with gradient, policy KL, both reference forwards) holds
    no [rows, positions, vocab] tensor: every forward goes through the vocab-chunked head."""
    from configs.base import get_config
    from kto_jax.perf import bench
    from kto_jax.sharding import make_mesh
    from kto_jax import step as S
    from kto_jax.step.optimizer import make_optimizer

    vocab, chunk = 520, 128
    cfg = get_config()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 4, 8
    cfg.train.logprob_vocab_chunk = chunk
    model_cfg = tiny(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_heads=2,
                     num_kv_heads=1, head_dim=16, dtype="bfloat16")
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx, schedule = make_optimizer(cfg.optim, 10)
    graphdef, state, shardings = bench.init_state(read_settings(cfg), model_cfg, tx, mesh, seed=0)
    opts = bench.BenchOptions(prompt_len=12, completion_len=10, bucket=16, micro_batch=4, accum=2)
    batch = bench.synthetic_batch(opts, vocab)
    step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings)
    compiled = step.lower(state, batch).compile()
    hlo = compiled.as_text()
    import re
    full = re.findall(rf"\w+\[\d+,\d+,{vocab}\]", hlo)
    assert not full, sorted(set(full))
    assert re.search(rf"f32\[\d+,16,{chunk}\]", hlo)  # the chunked head is there
    assert compiled.memory_analysis().alias_size_in_bytes > 0  # the state is donated


@pytest.mark.parametrize("window", [None, 48])
def test_splash_attention_matches_xla_causal_attention_values_and_grads(window):
    """The TPU kernel (Pallas interpret mode here), sharded over rows and heads by the mesh,
    equals XLA's causal (sliding-window) GQA attention, forward and backward."""
    from kto_jax.models.splash_attention import splash_attention
    from kto_jax.sharding import make_mesh
    rng = np.random.default_rng(1)
    b, t, h, k, hd = 4, 128, 4, 2, 16
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
                for s in ((b, t, h, hd), (b, t, k, hd), (b, t, k, hd)))
    scale = hd ** -0.5
    win = None if window is None else (window - 1, 0)

    def ref(q, kk, v):
        return jax.nn.dot_product_attention(q, kk, v, scale=scale, is_causal=True,
                                            local_window_size=win)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * jnp.cos(jnp.arange(hd)))

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        splash = jax.jit(lambda *a: splash_attention(*a, scale=scale, sliding_window=window))
        np.testing.assert_allclose(splash(q, kk, v), ref(q, kk, v), rtol=1e-4, atol=1e-4)
        got = jax.jit(jax.grad(loss(lambda *a: splash_attention(*a, scale=scale, sliding_window=window)),
                               argnums=(0, 1, 2)))(q, kk, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, kk, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)


def test_auto_attention_is_splash_on_tpu_for_mask_free_block_multiples(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert T.resolve_attention_impl("auto", _q(1024)) == "splash_on_tpu"
    assert T.resolve_attention_impl("auto", _q(1000)) is None
    assert T.resolve_attention_impl("auto", _q(1024), jnp.ones((2, 1, 1024, 1024), bool)) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert T.resolve_attention_impl("splash", _q(1024)) == "splash"  # explicit: interpret mode
    assert T.resolve_attention_impl("splash", _q(1024), jnp.ones((2, 1, 1024, 1024), bool)) is None


def test_transformer_with_splash_attention_equals_xla():
    """'splash' (the kernel, interpret mode here) and 'auto' (XLA when lowered for a CPU)."""
    ids = np.random.default_rng(2).integers(1, 96, (2, 128)).astype(np.int32)
    pos = np.broadcast_to(np.arange(128, dtype=np.int32), ids.shape)
    out = {}
    for impl in ("xla", "splash", "auto"):
        model = T.Transformer(MODEL.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        out[impl] = model.hidden_states(ids, pos, None)
    np.testing.assert_allclose(out["splash"], out["xla"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["auto"], out["xla"], rtol=1e-6, atol=1e-6)


@pytest.mark.xdist_group("libtpu")  # libtpu (pytest.ini)
def test_auto_attention_compiled_for_a_tpu_slice_runs_the_splash_kernel():
    """An AOT compile for TPU chips on this CPU host lowers 'auto' to the Mosaic kernel (what
    a TPU would run), so `kto-jax compile` memory figures include flash attention."""
    pytest.importorskip("libtpu", reason="libtpu (the tpu/test extra) is not installed")
    from jax.sharding import NamedSharding, PartitionSpec
    from kto_jax.perf import aot

    graphdef, params = nnx.split(T.abstract_model(MODEL))
    tpu = aot.parse_topology("v5e-4")
    mesh = aot.topology_mesh(aot.topology_devices(tpu), {"data": -1})
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec())), params)
    ids = jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("data")))

    def fn(params, ids):
        model = nnx.merge(graphdef, params)
        return model.hidden_states(ids, jnp.broadcast_to(jnp.arange(128), ids.shape), None)

    with jax.set_mesh(mesh):
        hlo = jax.jit(fn).lower(params, ids).as_text()
    assert "tpu_custom_call" in hlo
