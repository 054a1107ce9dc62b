"""`kto-jax online` on an 8-device CPU mesh (data=2 x fsdp=4): two rounds write their files
and `round` rows, and the initial policy's samples (round 0 held-out, round 1 training)
are the ones the 2-device run draws with the same seed: sampling keys do not depend on
the mesh. And the one-process rule: more than one JAX process is refused up front."""

import os

import pytest

from online_helpers import online_argv, online_env
from run_helpers import run_cli

from kto_jax.errors import UserError
from kto_jax.train.metrics import read_jsonl

MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=4",
        "--config.train.micro_batch_size=8", "--config.train.global_batch_size=16")


@pytest.mark.slow
def test_two_rounds_on_an_8_device_mesh_sample_what_2_devices_sample(
        online_run, tmp_path, tiny_model_dir, prompts_file, compile_cache):
    workdir = str(tmp_path / "mesh8")
    env = online_env(compile_cache, devices=8)
    run_cli(online_argv(workdir, tiny_model_dir, prompts_file, *MESH), env)
    # data x fsdp must fill the devices (kto_jax.sharding.make_mesh), so this ran on all 8
    import json
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        mesh = json.load(f)["mesh"]
    assert (mesh["data"], mesh["fsdp"], mesh["tensor"]) == (2, 4, 1)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["round"] for r in rows if r["kind"] == "round"] == [0, 1, 2]
    assert [(r["step"], r["round"]) for r in rows if r["kind"] == "train"] == \
        [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert os.path.getsize(os.path.join(workdir, "online.png")) > 1000
    assert os.listdir(os.path.join(workdir, "hf"))

    def samples(run, round_index, name):
        return [(s["prompt_id"], s["sample"], s["completion"], s["score"]) for s in
                read_jsonl(os.path.join(run, "rounds", f"{round_index:04d}", name))]
    # the initial policy's samples, drawn on 8 devices and on 2 with the same seeds
    assert samples(workdir, 0, "heldout.jsonl") == samples(online_run, 0, "heldout.jsonl")
    assert samples(workdir, 1, "samples.jsonl") == samples(online_run, 1, "samples.jsonl")
    first = [r for r in rows if r["kind"] == "round"][0]
    theirs = [r for r in read_jsonl(os.path.join(online_run, "metrics.jsonl"))
              if r["kind"] == "round"][0]
    assert first["judge/pass_rate"] == theirs["judge/pass_rate"] and first["kl_ref"] == 0.0


def test_online_refuses_more_than_one_process(monkeypatch, tmp_path):
    """Checked before the workdir lock, the model or anything written."""
    from kto_jax.config import config_file
    from kto_jax.online import runner
    config = config_file("online_tiny_cpu")
    monkeypatch.setattr(runner.jax, "process_count", lambda: 2)
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match="runs in one process, and JAX has 2 here") as err:
        runner.online(config, str(workdir))
    assert "one host" in str(err.value)
    assert not workdir.exists()
    monkeypatch.setattr(runner.jax, "process_count", lambda: 1)
    runner.check_single_process()  # one process: no error
