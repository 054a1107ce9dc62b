"""Exports of LoRA adapters trained on a quantised base (QLoRA).

- merged: the dequantised base + (alpha / r) A B per layer, cast once to the saved dtype,
  against a hand computation (float64 numpy from the stored codes' dequantised weights and
  the factors); the untouched tensors are the checkpoint's; transformers loads it to our
  quantised model's logits (float32 export);
- PEFT: the adapters alone, which `peft` loads onto the ORIGINAL unquantised model.
"""

import glob

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from hf_tiny_models import hf_logits, make_hf_model, padded_batch
from safetensors.numpy import load_file

from kto_jax.models import from_pretrained, lora, lora_io, positions_from_mask
from kto_jax.models import params as table
from kto_jax.models.quantized_base import Quantization, dequantized_model, quantized_rows

TARGETS = ("q_proj", "o_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_hf_model("llama2").save_pretrained(path)
    return path


def _adapters(config):
    adapters = lora.LoraAdapters(config, lora.LoraConfig(rank=4, alpha=12.0, target_modules=TARGETS),
                                 rngs=nnx.Rngs(2))
    keys = iter(jax.random.split(jax.random.key(4), len(TARGETS)))
    for t in TARGETS:
        var = getattr(adapters, t + lora.B_SUFFIX)
        var.set_value(0.1 * jax.random.normal(next(keys), var[...].shape))
    return adapters


@pytest.mark.parametrize("quantization", [
    Quantization("nf4", double_quant=True), pytest.param(Quantization("int8"), marks=pytest.mark.slow)],
    ids=["nf4_double", "int8"])
def test_merged_export_is_the_dequantised_base_plus_delta_per_layer(checkpoint, quantization, tmp_path):
    model, config = from_pretrained(checkpoint, quantization=quantization)
    adapters = _adapters(config)
    lora_io.save_merged(model, adapters, str(tmp_path / "bf16"), dtype="bfloat16")
    saved = _tensors(str(tmp_path / "bf16"))
    original = load_file(f"{checkpoint}/model.safetensors")
    dequantized = dequantized_model(model)
    rows = quantized_rows(config)
    for row in table.param_table(config):
        if row.path[-1] not in rows:   # embedding, norms, lm_head: the checkpoint's, in bfloat16
            for name in row.hf_names(config.num_layers) if row.stacked else [row.hf_name]:
                np.testing.assert_array_equal(saved[name].view(np.uint16),
                                              _bf16_bits(original[name]))
            continue
        w = np.asarray(getattr(dequantized.layers, row.path[-1])[...], np.float64)   # [L, *shape]
        if row.path[-1] in TARGETS:
            a, b = (np.asarray(x, np.float64) for x in adapters.factors(row.path[-1]))
            n, r = a.shape[0], a.shape[-1]
            w = w + adapters.scale * np.einsum("lir,lro->lio", a.reshape(n, -1, r),
                                               b.reshape(n, r, -1)).reshape(w.shape)
        for i, name in enumerate(row.hf_names(config.num_layers)):
            hand = table.to_hf(row.transform, w[i].astype(np.float32))
            got = saved[name].view(np.uint16)
            same = got == _bf16_bits(hand)
            # float32 sums in another order round to the same bfloat16 but for rare ties
            assert same.mean() > 0.999, (name, same.mean())
            np.testing.assert_allclose(_from_bf16(got), hand, rtol=2 ** -7, atol=1e-30)
    # float32 export: transformers computes our quantised model with the adapters on
    lora_io.save_merged(model, adapters, str(tmp_path / "f32"))
    ids, mask = padded_batch()
    pos = np.asarray(positions_from_mask(mask))
    ours = np.asarray(lora.attach(model, adapters)(ids, pos, mask))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.float32)
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(merged.eval(), ids, mask, pos)[real], ours[real], atol=1e-4, rtol=0)


def test_peft_export_loads_onto_the_original_unquantised_model(checkpoint, tmp_path):
    model, config = from_pretrained(checkpoint, quantization=Quantization("nf4"))
    float_model, _ = from_pretrained(checkpoint)
    adapters = _adapters(config)
    lora_io.save_peft(adapters, config, str(tmp_path / "peft"), base_model_name_or_path=checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with_peft = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    ids, mask = padded_batch()
    pos = np.asarray(positions_from_mask(mask))
    real = mask.astype(bool)
    via_peft = hf_logits(with_peft, ids, mask, pos)[real]
    on_float = np.asarray(lora.attach(float_model, adapters)(ids, pos, mask))[real]
    on_nf4 = np.asarray(lora.attach(model, adapters)(ids, pos, mask))[real]
    np.testing.assert_allclose(via_peft, on_float, atol=1e-4, rtol=0)
    assert np.abs(via_peft - on_nf4).max() > 1e-3  # it is the original base peft loads, not the NF4 one


def test_lora_merge_refuses_a_quantised_base(checkpoint):
    model, config = from_pretrained(checkpoint, quantization=Quantization("int8"))
    with pytest.raises(ValueError, match="save_merged"):
        lora.merge(model, _adapters(config))


def _tensors(directory: str) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(glob.glob(f"{directory}/*.safetensors")) for k, v in load_file(f).items()}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (as jnp / safetensors write them)."""
    return np.asarray(jax.numpy.asarray(np.asarray(x, np.float32)).astype(jax.numpy.bfloat16)).view(np.uint16)


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
