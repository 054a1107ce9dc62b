"""The files a run leaves: exports readable by everyone (as transformers' own), and no empty
workdir after a run that failed before its first step."""

import os

import jax
import pytest

from kto_jax import cli
from kto_jax import fs
from kto_jax.train import workdir as layout
from kto_jax.train.trainer import run_session
from run_helpers import TINY_CONFIG


@pytest.mark.slow
def test_export_files_get_the_mode_open_gives(reference_run, tmp_path):
    expected = fs.default_file_mode(str(tmp_path))
    assert expected == 0o666 & ~_umask()
    hf = os.path.join(reference_run, layout.HF_DIR)
    modes = {name: os.stat(os.path.join(hf, name)).st_mode & 0o777 for name in os.listdir(hf)}
    assert any(name.endswith(".safetensors") for name in modes)   # what safetensors wrote 0o600
    assert modes == dict.fromkeys(modes, expected), modes


def _umask() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))


def test_a_run_failing_at_setup_removes_the_workdir_it_created(tiny_model_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
                     f"--config.model.path={tiny_model_dir}",
                     f"--config.data.train_path={tmp_path / 'missing.jsonl'}"])
    assert code == 2 and "missing.jsonl" in capsys.readouterr().err
    assert not workdir.exists()


class _Run:
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])

    def close(self):
        pass


def _fail_in_session(workdir: str, write_before_failing) -> None:
    def setup():
        os.makedirs(layout.path(workdir, layout.CHECKPOINT_DIR))   # as Checkpointer does
        fs.write_text(layout.path(workdir, layout.CONFIG_FILE), "{}\n")
        return _Run()
    with pytest.raises(RuntimeError, match="first step failed"):
        with run_session(workdir, setup):
            write_before_failing()
            raise RuntimeError("first step failed")


def test_only_a_workdir_without_progress_is_removed(tmp_path):
    fresh = str(tmp_path / "fresh")
    _fail_in_session(fresh, lambda: None)
    assert not os.path.exists(fresh)

    logged = str(tmp_path / "logged")   # a step was logged before the failure: keep it all
    _fail_in_session(logged, lambda: fs.write_text(layout.path(logged, layout.METRICS_FILE), "{}\n"))
    assert os.path.exists(layout.path(logged, layout.METRICS_FILE))

    own = tmp_path / "own"              # the user's directory: never removed
    own.mkdir()
    _fail_in_session(str(own), lambda: None)
    assert own.is_dir() and (own / layout.CONFIG_FILE).exists()
