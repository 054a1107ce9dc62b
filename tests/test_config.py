"""Config loading: overrides apply with the field's type; mistakes name the key."""

import pytest

from kto_jax.config import config_to_json, load_config
from kto_jax.errors import UserError

BASE = "--config=configs/base.py"


def test_overrides_apply_with_field_types():
    config, rest, _ = load_config([BASE, "--config.optim.lr=1e-3", "--config.data.bucket_lengths=(128,256)",
                                   "--config.loss.name=dpo", "--config.optim.max_grad_norm=0"])
    assert config.optim.lr == pytest.approx(1e-3)
    assert tuple(config.data.bucket_lengths) == (128, 256)
    assert config.loss.name == "dpo"
    assert config.optim.max_grad_norm == 0.0 and isinstance(config.optim.max_grad_norm, float)
    assert rest == []
    assert '"lr": 0.001' in config_to_json(config)


def test_config_is_locked():
    config, _, _ = load_config([BASE])
    with pytest.raises(AttributeError):
        config.optim.new_field = 1


@pytest.mark.parametrize("argv, needle", [
    ([BASE, "--config.optim.lrr=1e-3"], "unknown config key optim.lrr"),
    # only the unknown key, not the valid override before it (a whole missing section)
    ([BASE, "--config.model.path=x", "--config.adapter.rank=1"], "unknown config key adapter.rank. "),
    ([BASE, "--config.model.path=x", "--config.data.path=y"], "unknown config key data.path. "),
    ([BASE, "--config.optim.lr=abc"], "bad value for config key optim.lr"),
    (["--config=configs/missing.py"], "configs/missing.py"),
    ([], "missing --config"),
    (["--config.optim.lr=1", BASE], "before any --config.KEY=VALUE"),
])
def test_bad_config_input_names_the_problem(argv, needle):
    with pytest.raises(UserError, match=None) as info:
        load_config(argv)
    assert needle in str(info.value)
