"""`kto-jax compile` with a quantised base (config.lora.base_quantization): the step lowers
and compiles for a TPU topology with the base's codes and scales as its arguments, which
are what models/base_memory.py prices for that base (up to the TPU's tile padding)."""

import pytest

from kto_jax.config import load_config
from kto_jax.models.base_memory import base_bytes_per_chip
from kto_jax.models.quantize import Quantization
from kto_jax.perf import aot, program

# libtpu (TPU compiles on this host): one xdist worker runs these tests (pytest.ini)
pytestmark = pytest.mark.xdist_group("libtpu")


def _config(*flags):
    config, _, _ = load_config(["--config=configs/tiny_cpu.py", "--config.lora.rank=4",
                                "--config.model.param_dtype=bfloat16", *flags])
    return config


def _arguments(config):
    model_config = program.model_config_of(config, "tiny")
    prompt_len, completion_len = program.sequence_lengths(config, None, None)
    report = aot.compile_for_topology(
        "v5e-4", lambda mesh: program.train_step_program(config, model_config, mesh, prompt_len, completion_len),
        aot.config_mesh_axes(config))
    assert report.fits and report.error is None, report
    return report.argument_bytes, model_config


@pytest.mark.slow
def test_compiled_qlora_step_holds_the_quantised_base_and_nothing_else_differs(capsys):
    bf16, model_config = _arguments(_config())
    nf4, nf4_config = _arguments(_config("--config.lora.base_quantization=nf4", "--config.lora.double_quant=True"))
    assert nf4_config.quantization == Quantization("nf4", double_quant=True)
    sizes = {"data": 4, "fsdp": 1, "tensor": 1}
    rules = _config().mesh.rules
    priced = {q: base_bytes_per_chip(model_config, q, sizes, rules)["total"]
              for q in (Quantization(), Quantization("nf4", double_quant=True))}
    saved = priced[Quantization()] - priced[Quantization("nf4", double_quant=True)]
    # the TPU pads small arrays to its tiles (the double quantisation's [L] offsets and [L, n]
    # block scales): within 1% of the priced difference, at these tiny sizes
    assert saved > 0 and abs((bf16 - nf4) - saved) <= 0.01 * saved, (bf16 - nf4, saved)
    from kto_jax import cli
    assert cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5e-4", "--model=tiny",
                     "--config.lora.rank=4", "--config.lora.base_quantization=nf4"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "QLoRA r4 (nf4 base, rest float32)" in first, first
