"""Which config changes a resume accepts (kto_jax/train/config_change.py)."""

import pytest

from kto_jax.config import load_config
from kto_jax.errors import UserError
from kto_jax.train.config_change import check_resume, split_changes


def _config(*flags):
    config, _, _ = load_config(["--config=configs/tiny_cpu.py", *flags])
    return config.to_dict()


def test_math_keys_are_errors_and_cadence_keys_warnings():
    saved = _config()
    now = _config("--config.loss.beta=0.3", "--config.model.path=/other", "--config.data.seed=4",
                  "--config.train.num_steps=99", "--config.train.eval_every=7",
                  "--config.checkpoint.every_steps=5", "--config.mesh.fsdp=2")
    math, free = split_changes(saved, now)
    assert math == ["data.seed", "loss.beta", "model.path"]
    assert free == ["checkpoint.every_steps", "mesh.fsdp", "train.eval_every", "train.num_steps"]
    with pytest.raises(UserError, match=r"data\.seed: 0 -> 4, loss\.beta: 0\.1 -> 0\.3, "
                                        r"model\.path: '' -> '/other'"):
        check_resume(saved, now, allow=False, where="W")
    assert "loss.beta: 0.1 -> 0.3" in check_resume(saved, now, allow=True, where="W")


def test_a_json_round_trip_is_no_change():
    saved = _config()
    now = dict(saved, data=dict(saved["data"], bucket_lengths=list(saved["data"]["bucket_lengths"])))
    assert split_changes(saved, now) == ([], [])
    assert check_resume(saved, now, allow=False, where="W") is None


def test_data_paths_move_freely_the_fingerprint_guards_the_data():
    """Moving the same data (to a bucket, to its prepared directory) is not a change of the
    mathematics; other data is refused by the data iterator's fingerprint on restore."""
    saved = _config("--config.data.train_path=/data/train.jsonl", "--config.data.eval_path=/data/e.jsonl")
    now = _config("--config.data.train_path=gs://bucket/prepared", "--config.data.eval_path=")
    assert split_changes(saved, now) == ([], ["data.eval_path", "data.train_path"])
    warning = check_resume(saved, now, allow=False, where="W")
    assert "data.train_path: '/data/train.jsonl' -> 'gs://bucket/prepared'" in warning
