"""The quantiser against bitsandbytes (CPU): NF4 codes, block absmaxes, double quantisation,
int8 per channel, bit for bit; our layout; dequantising one layer inside a scan."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from kto_jax.models import quantize as qz

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

# (out, in) of HF weights: square, a long row (Llama-3-8B down_proj's in / 64 = 224 blocks,
# so the 256-absmax blocks of double quantisation straddle rows), a short one.
dequantize = jax.jit(qz.dequantize, static_argnums=1)
HF_SHAPES = [(64, 128), (96, 64 * 7), (48, 64 * 37)]
DTYPES = [torch.float32, torch.bfloat16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(*shape, generator=g)
    w[0, :64] = 0.0                                  # an all-zero block
    w[1, 3] = 1.5                                    # an outlier: its block's absmax
    return w.to(dtype)


def _numpy(w: torch.Tensor) -> np.ndarray:
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return w.numpy()


@pytest.fixture
def our_dynamic_map():
    """bitsandbytes' double quantisation made to use our 8-bit map (within 1 ulp of its own)."""
    saved = F.name2qmap.get("dynamic")
    F.name2qmap["dynamic"] = torch.from_numpy(qz.DYNAMIC_CODE.copy())
    yield
    if saved is None:
        F.name2qmap.pop("dynamic")
    else:
        F.name2qmap["dynamic"] = saved


def test_code_tables_are_bitsandbytes():
    np.testing.assert_array_equal(qz.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    theirs = F.create_dynamic_map().numpy()
    assert np.all(np.diff(qz.DYNAMIC_CODE) > 0) and qz.DYNAMIC_CODE[[0, 127, 255]].tolist() == \
        pytest.approx([-0.9929687, 0.0, 1.0], abs=1e-7)
    ulps = np.abs(qz.DYNAMIC_CODE.view(np.int32) - theirs.view(np.int32))
    assert ulps.max() <= 1, ulps.max()


def test_nf4_bounds_are_the_gpu_kernels_thresholds():
    """bitsandbytes' CUDA kernel (csrc/kernels.cu, dQuantizeNF4) compares |x| > t with these
    literal thresholds: as float32 they are our midpoints, so a GPU quantises as we do."""
    cuda = [0.03979014977812767, 0.045525018125772476, 0.1202552504837513, 0.13791173323988914,
            0.2035212516784668, 0.23460740596055984, 0.2920137718319893, 0.33967943489551544,
            0.3893125355243683, 0.4599952697753906, 0.5016634166240692, 0.6106329262256622,
            0.6427869200706482, 0.8480964004993439, 0.8614784181118011]
    bounds = (qz.NF4_CODE[:-1] + qz.NF4_CODE[1:]) / np.float32(2)
    np.testing.assert_array_equal(np.sort(np.abs(bounds)), np.asarray(cuda, np.float32))


def test_nf4_packs_the_first_value_in_the_high_nibble():
    row = np.zeros(64, np.float32)
    row[:4] = [2.0, -2.0, 0.3, 1.0]   # absmax 2: codes 15 (1.0), 0 (-1.0), 9 (0.15 -> 0.1609), 12 (0.5 -> 0.4407)
    packed, absmax = qz.quantize_nf4(row[None])
    assert packed[0, :3].tolist() == [0xF0, 0x9C, 0x77] and absmax.tolist() == [[2.0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HF_SHAPES, ids=str)
def test_nf4_equals_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, absmax = qz.quantize_nf4(_numpy(w))
    np.testing.assert_array_equal(packed.reshape(-1), q.numpy().reshape(-1))
    np.testing.assert_array_equal(absmax.reshape(-1), state.absmax.numpy())
    # Ours in our layout (HF transposed) dequantises to bitsandbytes' dequantize_4bit, exactly.
    ours = qz.quantize_weight(_numpy(w), shape[::-1], 1, "nf4")
    assert ours.codes.shape == (shape[1] // 2, shape[0]) and ours.absmax.shape == (shape[1] // 64, shape[0])
    got = dequantize(ours, jnp.dtype(str(dtype).removeprefix("torch.")))
    want = F.dequantize_4bit(q, state)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want.float().numpy().T)


def test_double_quantisation_dequantises_as_bitsandbytes(our_dynamic_map):
    """bitsandbytes' double-quantised state, read into our layout: the same weight, exactly
    op by op; under jit XLA fuses the absmax's code * scale + offset into one FMA (one
    rounding where bitsandbytes rounds twice), so a block's absmax may differ in its last bit."""
    shape = HF_SHAPES[2]
    for dtype in DTYPES:
        w = _weight(shape, dtype, seed=1)
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        blocks = (shape[0], shape[1] // 64)
        stats = qz.DoubleQuant(state.absmax.numpy().reshape(blocks).T.copy(), state.state2.absmax.numpy(),
                               state.offset.numpy())
        ours = qz.Nf4Weight(q.numpy().reshape(shape[0], -1).T.copy(), stats, shape=shape[::-1], n_in=1)
        jdtype = jnp.dtype(str(dtype).removeprefix("torch."))
        want = F.dequantize_4bit(q, state).float().numpy().T
        with jax.disable_jit():
            np.testing.assert_array_equal(np.asarray(qz.dequantize(ours, jdtype), np.float32), want)
        got = np.asarray(dequantize(ours, jdtype), np.float32)
        absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
        absmax = np.repeat(absmax.reshape(blocks), 64, axis=1).T                # each value's block absmax
        ulp = np.spacing(np.abs(want).astype(jdtype)).astype(np.float32)        # the output dtype's rounding
        assert np.all(np.abs(got - want) <= np.maximum(ulp, absmax * 2.0 ** -22))
        assert np.mean(got != want) < 0.1


def test_double_quantisation_state_is_bitsandbytes(our_dynamic_map):
    w = _weight(HF_SHAPES[2], torch.float32, seed=2)
    _, plain = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    _, nested = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = plain.absmax.numpy()
    codes, scales, offset = qz.double_quantize(absmax)
    assert offset == pytest.approx(nested.offset.item(), rel=1e-6)
    # The 8-bit step on bitsandbytes' own offset: the same block absmaxes; the same codes except
    # where its CPU kernel's 65536-bin lookup misses the nearest entry and ours does not.
    codes, scales = qz.quantize_blockwise(absmax - nested.offset.numpy())
    np.testing.assert_array_equal(scales, nested.state2.absmax.numpy())
    theirs = nested.absmax.numpy()
    scaled = (absmax - nested.offset.numpy()) / np.repeat(scales, 256)[:absmax.size]
    differ = codes != theirs
    assert differ.mean() < 0.01, differ.sum()
    near = np.abs(scaled - qz.DYNAMIC_CODE[codes])
    assert np.all(near[differ] < np.abs(scaled - qz.DYNAMIC_CODE[theirs])[differ])
    assert np.all(near <= np.abs(scaled - qz.DYNAMIC_CODE[theirs]))


def test_double_quantised_weight_stays_within_a_step():
    hf = _numpy(_weight(HF_SHAPES[1], torch.float32, seed=3))
    plain = qz.quantize_weight(hf, hf.shape[::-1], 1, "nf4")
    double = qz.quantize_weight(hf, hf.shape[::-1], 1, "nf4", double_quant=True)
    np.testing.assert_array_equal(double.codes, plain.codes)          # the 4-bit codes do not change
    exact, approx = plain.absmax, np.asarray(jax.jit(qz.block_absmax, static_argnums=1)(double.absmax, 1))
    # Each absmax within half the widest gap of the 8-bit map (0.9 / 64, near +-1) of its block's scale.
    half_gap = np.diff(qz.DYNAMIC_CODE).max() / 2
    assert np.all(np.abs(approx - exact) <= half_gap * double.absmax.absmax.max() * (1 + 1e-6))
    assert np.abs(approx - exact).max() > 0
    values, blocks = hf.size, hf.size // 64
    assert qz.nbytes(plain) == values // 2 + 4 * blocks                        # 4.5 bits per value
    assert qz.nbytes(double) == values // 2 + blocks + 4 * -(-blocks // 256) + 4  # 4.127 bits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_equals_bitsandbytes_and_rounds_to_half_a_step(dtype):
    w = _weight(HF_SHAPES[1], dtype)
    codes, absmax = qz.quantize_int8(_numpy(w))
    theirs, stats, _ = F.int8_vectorwise_quant(w.clone())
    real = absmax > 0                                  # bitsandbytes' codes of an all-zero row are 0/0
    assert real.sum() == len(real) and codes.dtype == np.int8
    np.testing.assert_array_equal(codes, theirs.numpy())
    np.testing.assert_array_equal(absmax, stats.numpy())
    ours = qz.quantize_weight(_numpy(w), w.shape[::-1], 1, "int8")
    got = np.asarray(dequantize(ours, jnp.float32))
    np.testing.assert_array_equal(got, F.int8_vectorwise_dequant(theirs, stats).numpy().T)
    err = np.abs(got - w.float().numpy().T)
    assert np.all(err <= absmax / 254 + absmax * 2.0 ** -22) and err.max() > absmax.max() / 1000


def test_zero_rows_and_blocks_quantise_to_zero():
    hf = np.zeros((2, 128), np.float32)
    hf[1, 64:] = 0.5
    for scheme in qz.SCHEMES:
        w = qz.quantize_weight(hf, (128, 2), 1, scheme, double_quant=scheme == "nf4")
        np.testing.assert_array_equal(np.asarray(dequantize(w, jnp.float32)), hf.T)


@pytest.mark.parametrize("scheme", ["int8", "nf4", "nf4_double"])
def test_our_layout_per_transform(scheme):
    """q_proj-like [D, H, hd] (one input axis) and o_proj-like [H, hd, D] (two): the quantised
    arrays keep the output axes, and dequantising gives the HF weight's dequantisation in our layout."""
    scheme, double = scheme.removesuffix("_double"), scheme.endswith("_double")
    rng = np.random.default_rng(0)
    for shape, n_in in (((128, 4, 16), 1), ((4, 32, 192), 2)):
        in_size, out_size = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
        hf = (0.05 * rng.standard_normal((out_size, in_size))).astype(np.float32)
        w = qz.quantize_weight(hf, shape, n_in, scheme, double)
        flat = qz.quantize_weight(hf, (in_size, out_size), 1, scheme, double)  # a plain Linear
        want = np.asarray(dequantize(flat, jnp.float32)).reshape(shape)     # HF.T reshaped: ours
        np.testing.assert_array_equal(np.asarray(dequantize(w, jnp.float32)), want)
        abstract = qz.abstract_weight(shape, n_in, scheme, double)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), w) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
        assert qz.nbytes(w) == qz.nbytes(abstract)


@pytest.mark.parametrize("scheme", ["int8", "nf4", "nf4_double"])
def test_one_layer_inside_a_scan_equals_the_stack(scheme):
    scheme, double = scheme.removesuffix("_double"), scheme.endswith("_double")
    rng = np.random.default_rng(1)
    shape, layers = (64 * 5, 2, 16), 3
    stacked = qz.stack([qz.quantize_weight((0.1 * rng.standard_normal((32, 320))).astype(np.float32),
                                           shape, 1, scheme, double) for _ in range(layers)])
    assert jax.tree.leaves(stacked)[0].shape[0] == layers
    whole = np.asarray(dequantize(stacked, jnp.bfloat16))        # [L, 320, 2, 16]
    assert whole.shape == (layers, *shape)

    @jax.jit
    def scanned(w):
        return jax.lax.scan(lambda c, w_i: (c, qz.dequantize(w_i, jnp.bfloat16)), 0, w)[1]

    np.testing.assert_array_equal(np.asarray(scanned(stacked)), whole)
    one = jax.jit(lambda w, i: qz.dequantize(qz.layer(w, i), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(one(stacked, 2)), whole[2])


def test_logical_axes_follow_the_weight():
    q = qz.abstract_weight((64, 4, 16), 1, "nf4", True, lead=(2,))
    axes = qz.quantized_axes(q, ("layers", "embed", "heads", "head_dim"))
    assert axes.codes == ("layers", "embed", "heads", "head_dim")
    assert axes.absmax.codes == ("layers", "embed", "heads", "head_dim")
    assert axes.absmax.absmax == ("layers", None) and axes.absmax.offset == ("layers",)
    o = qz.quantized_axes(qz.abstract_weight((4, 16, 64), 2, "int8", lead=(2,)),
                          ("layers", "heads", "head_dim", "embed"))
    assert o.codes == ("layers", "heads", "head_dim", "embed") and o.absmax == ("layers", "embed")
    o4 = qz.quantized_axes(qz.abstract_weight((4, 16, 64), 2, "nf4", lead=(2,)),
                           ("layers", "heads", "head_dim", "embed"))
    assert o4.codes == ("layers", "heads", "embed") and o4.absmax == ("layers", "heads", "embed")


def test_nf4_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 64"):
        qz.quantize_nf4(np.zeros((4, 96), np.float32))
