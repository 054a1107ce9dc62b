"""`kto-jax train` / `kto-jax export` argument errors: exit 2, the key named, no traceback."""

import os
import subprocess
import sys

import pytest

from kto_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=" + os.path.join(REPO, "configs", "tiny_cpu.py")


@pytest.mark.parametrize("extra, needle", [
    (["--config.optim.lrr=1e-3"], "optim.lrr"),
    (["--config.optim.lr=fast"], "optim.lr"),
    (["--config.train.num_steps=1.5"], "train.num_steps"),
    (["--config.nosuchsection.x=1"], "nosuchsection"),
])
def test_bad_config_keys_exit_2_naming_the_key(tmp_path, capsys, extra, needle):
    code = cli.main(["train", TINY, f"--workdir={tmp_path}"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert not os.listdir(tmp_path)  # nothing started


def test_missing_workdir_and_stray_arguments(capsys):
    assert cli.main(["train", TINY]) == 2
    assert "--workdir" in capsys.readouterr().err
    assert cli.main(["train", TINY, "--workdir=/tmp/x", "extra"]) == 2
    assert "unexpected arguments" in capsys.readouterr().err


def test_subcommands_are_listed(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "export" in out


def test_export_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err and "Traceback" not in err


def test_console_script_path_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kto_jax.cli", "train", TINY,
                           f"--workdir={tmp_path}", "--config.optim.lr=abc"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr" in proc.stderr and "Traceback" not in proc.stderr
