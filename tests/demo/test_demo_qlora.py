"""`kto-jax demo --lora --base-quantization=nf4`: the flags the demo's training gets, and the
refusals (no LoRA, or --online)."""

from kto_jax import cli
from kto_jax.demo import pipeline


def test_the_training_gets_the_quantised_base_flags():
    size = pipeline.SIZES["quick"]
    flags = pipeline.lora_flags(size, 16, "nf4")
    assert flags[-2:] == ("--config.lora.base_quantization=nf4", "--config.lora.double_quant=True")
    assert pipeline.lora_flags(size, 16, "int8")[-2:] == ("--config.lora.base_quantization=int8",
                                                          "--config.lora.double_quant=False")
    assert pipeline.lora_flags(size, 16) == flags[:-2]           # bf16-base LoRA: as before
    assert pipeline.lora_flags(size, 0, "nf4") == ()             # no LoRA: nothing


def test_a_quantised_base_needs_the_offline_lora_demo(tmp_path, capsys):
    assert cli.main(["demo", "--workdir", str(tmp_path / "a"), "--base-quantization=nf4"]) == 2
    assert "add --lora" in capsys.readouterr().err
    assert cli.main(["demo", "--workdir", str(tmp_path / "b"), "--lora", "--online",
                     "--base-quantization=nf4"]) == 2
