"""FLOP counts (hand-computed and against a real parameter count) and MFU."""

import pytest

from kto_jax.losses.registry import get_loss
from kto_jax.step import flops


DIMS = flops.ModelDims(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                       head_dim=16, vocab=100)


def test_matmul_params_match_a_transformers_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embedding = model.model.embed_tokens.weight.numel()
    dims = flops.ModelDims.from_hf_config(cfg.to_dict())
    assert dims == DIMS
    assert dims.matmul_params() == total - norms - embedding


def test_forward_flops_by_hand():
    # per layer: q,o 2*64*64 + k,v 2*64*32 = 12288; mlp 3*64*128 = 24576; lm_head 6400
    n = 2 * (12288 + 24576) + 6400
    assert DIMS.matmul_params() == n
    t = 10
    assert flops.forward_flops(DIMS, t) == 2 * n * t + 4 * 2 * 4 * 16 * t * t


@pytest.mark.parametrize("loss,reference,expected", [
    ("kto", "model", (1, 3)),          # KL forward of policy + reference on (x,y) and (x,y')
    ("kto", "precomputed", (1, 1)),    # only the policy's KL forward
    ("kto_reference_free", "model", (1, 1)),
    ("kto_no_z0", "model", (1, 1)),
    ("dpo", "model", (2, 2)),
    ("dpo", "precomputed", (2, 0)),
    ("sft", "model", (1, 0)),
    ("simpo", "none", (2, 0)),
    ("ppo_offline", "model", (1, 1)),
])
def test_forward_passes(loss, reference, expected):
    assert flops.forward_passes(get_loss(loss), reference) == expected


def test_step_flops_and_mfu():
    f = flops.forward_flops(DIMS, 32)
    step = flops.step_flops(DIMS, loss=get_loss("kto"), reference_source="model", global_batch=8,
                            seq_len=32)
    assert step == 8 * f * (3 + 3)
    assert flops.mfu(step, 2.0, 4, 1e12) == pytest.approx(step / 2.0 / 4e12)
    assert flops.mfu(step, 2.0, 4, None) == 0.0
    # packed rows: one policy pass (y and y_kl together) with its backward, one reference pass
    rows = flops.step_flops(DIMS, loss=get_loss("kto"), reference_source="model", global_batch=3,
                            seq_len=128, packed=True)
    assert rows == 3 * flops.forward_flops(DIMS, 128) * (3 + 1)
    assert flops.forward_passes(get_loss("dpo"), "precomputed", packed=True) == (1, 0)
    # + kl rows of 64 tokens beside each row: forward only, for the policy and the reference;
    # their queries attend the row's 128 keys and their own 64
    kl = 2.0 * DIMS.matmul_params() * 64 + 4.0 * DIMS.layers * DIMS.heads * DIMS.head_dim * 64 * 192
    with_kl = flops.step_flops(DIMS, loss=get_loss("kto"), reference_source="model",
                               global_batch=3, seq_len=128, packed=True, kl_len=64)
    assert with_kl == pytest.approx(rows + 3 * 2 * kl)
    assert flops.step_flops(DIMS, loss=get_loss("kto"), reference_source="precomputed",
                            global_batch=3, seq_len=128, packed=True, kl_len=64) == pytest.approx(
        3 * (3 * flops.forward_flops(DIMS, 128) + kl))


def test_peak_lookup():
    assert flops.peak_flops_per_device("TPU v5 lite", "tpu") == 197e12
    assert flops.peak_flops_per_device("TPU v5", "tpu") == 459e12
    assert flops.peak_flops_per_device("NVIDIA H100 PCIe", "gpu") == 756e12
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3", "gpu") == 989e12
    assert flops.peak_flops_per_device("cpu", "cpu") is None
    assert flops.peak_flops_per_device("Mystery chip", "gpu") is None
