"""config.lora.base_quantization / double_quant: read once, checked, refused without LoRA,
guarded on resume."""

import pytest

from kto_jax.config import load_config
from kto_jax.errors import UserError
from kto_jax.models.quantize import Quantization
from kto_jax.train.config_change import check_resume
from kto_jax.train.settings import read_settings


def _config(*flags):
    config, _, _ = load_config(["--config=configs/tiny_cpu.py", *flags])
    return config


def test_the_scheme_reaches_the_loader_options():
    settings = read_settings(_config("--config.lora.rank=4", "--config.lora.base_quantization=nf4",
                                     "--config.lora.double_quant=True"))
    assert settings.model.quantization == Quantization("nf4", double_quant=True)
    assert settings.model.load_options()["quantization"] == Quantization("nf4", double_quant=True)
    assert read_settings(_config()).model.quantization == Quantization()   # the default: none


@pytest.mark.parametrize("flags, needle", [
    (("--config.lora.base_quantization=nf4",), r"LoRA is off \(config.lora.rank=0\).*--config.lora.rank=16"),
    (("--config.lora.rank=4", "--config.lora.base_quantization=fp4"), r"base_quantization='fp4': choose none, int8, nf4"),
    (("--config.lora.rank=4", "--config.lora.base_quantization=int8", "--config.lora.double_quant=True"),
     r"double_quant=True.*--config.lora.base_quantization=nf4"),
])
def test_bad_settings_name_the_fix(flags, needle):
    with pytest.raises(UserError, match=needle):
        read_settings(_config(*flags))


def test_changing_the_base_quantization_refuses_a_resume():
    saved = _config("--config.lora.rank=4", "--config.lora.base_quantization=nf4").to_dict()
    for flag in ("--config.lora.base_quantization=int8", "--config.lora.double_quant=True"):
        now = _config("--config.lora.rank=4", "--config.lora.base_quantization=nf4", flag).to_dict()
        with pytest.raises(UserError, match="lora.(base_quantization|double_quant)"):
            check_resume(saved, now, allow=False, where="W")
