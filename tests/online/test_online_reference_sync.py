"""kto-jax online refuses reference syncing (it has its own online.reference="refresh")."""

import pytest

from configs.base import get_config
from kto_jax.errors import UserError
from kto_jax.online.settings import check_online_config


def _online(**over):
    cfg = get_config()
    cfg.online.prompts_path, cfg.online.judge = "prompts.jsonl", "http"
    for key, value in over.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def test_online_refuses_reference_syncing_and_humanline():
    check_online_config(_online())  # the base online config is fine
    with pytest.raises(UserError, match="reference syncing .*online.reference=\"refresh\""):
        check_online_config(_online(**{"reference.sync_every": 4}))
    with pytest.raises(UserError, match="loss 'humanline''s own"):
        check_online_config(_online(**{"loss.name": "humanline"}))
